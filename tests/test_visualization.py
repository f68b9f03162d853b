"""The t-SNE film and the pictures, on the fixture."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import train_mnist_cnn as tm
from conftest import ROOT

TSNE_RUN = ['--device', 'cpu', '--epochs', '2', '--log-interval', '4', '--tsne-points', '150']  # 6 frames


@pytest.fixture
def film_run(tmp_path, data_dir, monkeypatch):
    """A run with the film on; also keeps the features each frame was made from."""
    features = []
    real_add_frame = tm.TsneFilm.add_frame

    def add_frame(self, batch, step, title, last=False):
        features.append(batch.numpy().copy())
        real_add_frame(self, batch, step, title, last)
    monkeypatch.setattr(tm.TsneFilm, 'add_frame', add_frame)
    run = tmp_path / 'run'
    assert tm.main([*TSNE_RUN, '--data-dir', str(data_dir), '--out-dir', str(run)]) == 0
    return run, features


def test_film_has_a_frame_per_log_step_and_documented_files(film_run):
    run, features = film_run
    with Image.open(run / 'tsne.gif') as gif:
        assert gif.n_frames == 6
    film = np.load(run / 'tsne.npz')
    assert film['embeddings'].shape == (6, 150, 2)
    assert film['labels'].shape == (150,) and film['steps'].tolist() == [4, 8, 12, 16, 20, 24]
    assert len(features) == 6
    for name in ('tsne.png', 'curves.png', 'confusion.png', 'samples.png'):
        with Image.open(run / name) as picture:
            assert picture.format == 'PNG' and min(picture.size) > 200
    summary = json.loads((run / 'summary.json').read_text())
    assert summary['tsne_frames'] == 6 and 0 <= summary['tsne_jump'] < 1
    assert not [p for p in os.listdir(run) if p.startswith('.tmp')]


def test_frames_glide_where_independent_frames_jump(film_run):
    from sklearn.manifold import TSNE
    run, features = film_run
    ours = np.load(run / 'tsne.npz')['embeddings']
    independent = np.stack([TSNE(init='pca', random_state=1).fit_transform(f) for f in features])
    assert tm.frame_jump(ours) < tm.frame_jump(independent) / 2


def test_frame_jump_and_neighbour_agreement_measure_what_they_say():
    rng = np.random.default_rng(0)
    still = np.repeat(rng.normal(size=(1, 40, 2)), 3, axis=0)
    assert tm.frame_jump(still) == 0
    assert tm.frame_jump(still * 5 + 3) == 0  # each frame is scaled to its own box
    assert tm.frame_jump(np.stack([still[0], still[0][::-1]])) > 0.2
    labels = np.repeat(np.arange(4), 11)
    clusters = np.repeat(np.array([[0, 0], [10, 0], [0, 10], [10, 10]]), 11, axis=0) + rng.normal(size=(44, 2))
    assert tm.neighbour_agreement(clusters, labels) == 1.0
    assert tm.neighbour_agreement(rng.normal(size=(44, 2)), labels) < 0.6


def test_confusion_picture_counts_every_test_image(tmp_path, data_dir, monkeypatch):
    seen = {}
    monkeypatch.setattr(tm, 'draw_pictures', lambda out, metrics, confusion, *rest: seen.update(c=confusion))
    assert tm.main(['--no-tsne', '--log-interval', '4', '--data-dir', str(data_dir),
                    '--out-dir', str(tmp_path / 'run')]) == 0
    confusion = seen['c']
    summary = json.loads((tmp_path / 'run' / 'summary.json').read_text())
    assert confusion.sum() == 200 and confusion.shape == (10, 10)
    assert np.trace(confusion) / 200 == pytest.approx(summary['test_accuracy'])


def run_child(code, tmp_path, fixture_checksums, env_changes):
    env = {**os.environ, 'PYTHONPATH': ROOT, **env_changes}
    for name in [k for k, v in env_changes.items() if v is None]:
        env.pop(name)
    prelude = f'import sys, train_mnist_cnn as tm; tm.MNIST_MD5.update({fixture_checksums!r}); '
    return subprocess.run([sys.executable, '-c', prelude + code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


def test_no_tsne_never_imports_scikit_learn(tmp_path, data_dir, fixture_checksums):
    code = (f'code = tm.main(["--no-tsne", "--log-interval", "4", "--data-dir", {str(data_dir)!r}]); '
            'print("sklearn" in sys.modules, "matplotlib.animation" in sys.modules); sys.exit(code)')
    out = run_child(code, tmp_path, fixture_checksums, {'MPLBACKEND': 'Agg'})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == 'False False'


def test_film_runs_without_a_display(tmp_path, data_dir, fixture_checksums):
    code = (f'sys.exit(tm.main(["--log-interval", "6", "--tsne-points", "100", "--data-dir", {str(data_dir)!r},'
            f' "--out-dir", "run"]))')
    out = run_child(code, tmp_path, fixture_checksums, {'MPLBACKEND': None, 'DISPLAY': None, 'WAYLAND_DISPLAY': None})
    assert out.returncode == 0, out.stderr
    assert 'Traceback' not in out.stderr
    with Image.open(tmp_path / 'run' / 'tsne.gif') as gif:
        assert gif.n_frames == 2


def test_film_survives_a_resume(tmp_path, data_dir):
    run = tmp_path / 'run'
    assert tm.main([*TSNE_RUN, '--epochs', '1', '--data-dir', str(data_dir), '--out-dir', str(run)]) == 0
    assert tm.main(['--resume', str(run), '--epochs', '2']) == 0
    film = np.load(run / 'tsne.npz')
    assert film['steps'].tolist() == [4, 8, 12, 16, 20, 24]
    with Image.open(run / 'tsne.gif') as gif:
        assert gif.n_frames == 6
