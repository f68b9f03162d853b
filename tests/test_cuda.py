"""The GPU path, ready to prove in one go: these run where torch sees a CUDA device and skip elsewhere.
tests/gpu_check.sh runs them with the benchmark on a machine with a GPU."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import train_mnist_cnn as tm
from conftest import FAST, ROOT
from test_distributed import torchrun

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device: torch.cuda.is_available() '
                                 f'is False (torch {torch.__version__}, built with CUDA {torch.version.cuda})')]
GPU = [*FAST[:FAST.index('--device')], *FAST[FAST.index('--device') + 2:], '--device', 'cuda']


@pytest.mark.parametrize('precision', ['fp32', 'bf16'])
def test_a_short_run_on_cuda(tmp_path, data_dir, precision):
    run = tmp_path / 'run'
    assert tm.main([*GPU, '--epochs', '2', '--precision', precision, '--data-dir', str(data_dir),
                    '--out-dir', str(run)]) == 0
    summary = json.loads((run / 'summary.json').read_text())
    assert summary['device'].startswith('cuda') and summary['test_accuracy'] > 0.9
    checkpoint = torch.load(run / 'model.pt', weights_only=True)
    assert {t.device.type for t in checkpoint['model'].values()} == {'cpu'}  # loadable anywhere
    assert {t.dtype for t in checkpoint['model'].values()} == {torch.float32}


def test_resume_on_cuda_and_a_cuda_checkpoint_on_cpu(tmp_path, data_dir):
    run = tmp_path / 'run'
    assert tm.main([*GPU, '--data-dir', str(data_dir), '--out-dir', str(run)]) == 0
    assert tm.main(['--resume', str(run), '--epochs', '2']) == 0
    assert json.loads((run / 'summary.json').read_text())['steps'] == 24
    assert tm.main(['--resume', str(run), '--epochs', '3', '--device', 'cpu']) == 0
    summary = json.loads((run / 'summary.json').read_text())
    assert summary['steps'] == 36 and summary['device'] == 'cpu'


def test_the_films_background_thread_with_cuda_features(tmp_path, data_dir):
    run = tmp_path / 'run'
    flags = [flag for flag in GPU if flag != '--no-tsne']
    assert tm.main([*flags, '--epochs', '2', '--tsne-points', '100', '--data-dir', str(data_dir),
                    '--out-dir', str(run)]) == 0
    film = np.load(run / 'tsne.npz')
    assert film['embeddings'].shape == (6, 100, 2) and film['steps'].tolist() == [4, 8, 12, 16, 20, 24]


def test_torchrun_with_nccl_and_one_process(tmp_path, data_dir, fixture_checksums):
    out = torchrun(tmp_path, fixture_checksums, [*GPU, '--data-dir', data_dir, '--out-dir', tmp_path / 'run'],
                   processes=1)
    assert out.returncode == 0, out.stderr[-3000:]
    assert 'device: cuda:0' in out.stdout
    assert json.loads((tmp_path / 'run' / 'summary.json').read_text())['device'] == 'cuda:0'


def test_the_script_as_a_user_runs_it(tmp_path, data_dir, fixture_checksums):
    code = ('import sys, train_mnist_cnn as tm; '
            f'tm.MNIST_MD5.update({fixture_checksums!r}); sys.exit(tm.main(sys.argv[1:]))')
    out = subprocess.run([sys.executable, '-c', code, *GPU, '--data-dir', str(data_dir), '--out-dir',
                          str(tmp_path / 'run')], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].startswith('device: cuda')
