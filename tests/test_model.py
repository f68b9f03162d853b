"""The tutorial's network: its layers, its state_dict keys, its two outputs."""
import torch

import train_mnist_cnn as tm


def test_forward_returns_logits_and_1568_features():
    logits, features = tm.CNN()(torch.zeros(7, 1, 28, 28))
    assert logits.shape == (7, 10)
    assert features.shape == (7, 1568)


def test_state_dict_keys_match_the_tutorial():
    shapes = {name: tuple(t.shape) for name, t in tm.CNN().state_dict().items()}
    assert shapes == {
        'conv1.0.weight': (16, 1, 5, 5), 'conv1.0.bias': (16,),
        'conv2.0.weight': (32, 16, 5, 5), 'conv2.0.bias': (32,),
        'out.weight': (10, 1568), 'out.bias': (10,),
    }


def test_layers_are_conv_relu_maxpool_blocks():
    model = tm.CNN()
    for block in (model.conv1, model.conv2):
        assert [type(m) for m in block] == [torch.nn.Conv2d, torch.nn.ReLU, torch.nn.MaxPool2d]
    assert model.conv1[0].kernel_size == (5, 5) and model.conv1[0].padding == (2, 2)


def test_features_are_the_flattened_second_block():
    model = tm.CNN()
    x = torch.rand(3, 1, 28, 28)
    _, features = model(x)
    assert torch.equal(features, model.conv2(model.conv1(x)).reshape(3, -1))
