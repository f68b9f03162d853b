"""The t-SNE film and the pictures, on the fixture."""
import ctypes.util
import json
import os
import signal
import subprocess
import sys

import numpy as np
import torch
from matplotlib.figure import Figure
import pytest
from PIL import Image, ImageSequence

import train_mnist_cnn as tm
from conftest import ROOT

TSNE_RUN = ['--device', 'cpu', '--epochs', '2', '--log-interval', '4', '--tsne-points', '150']  # 6 frames


@pytest.fixture
def film_run(tmp_path, data_dir, monkeypatch):
    """A run with the film on; also keeps the features each frame was made from."""
    features = []
    real_add_frame = tm.TsneFilm.add_frame

    def add_frame(self, batch, predictions, step, title, last=False):
        features.append(batch.numpy().copy())
        real_add_frame(self, batch, predictions, step, title, last)
    monkeypatch.setattr(tm.TsneFilm, 'add_frame', add_frame)
    run = tmp_path / 'run'
    assert tm.main([*TSNE_RUN, '--data-dir', str(data_dir), '--out-dir', str(run)]) == 0
    return run, features


def gif_durations(path):
    with Image.open(path) as gif:
        return [frame.info['duration'] for frame in ImageSequence.Iterator(gif)], gif.size


def test_film_has_an_embedded_frame_per_log_step_gliding_between_them(film_run):
    run, features = film_run
    durations, size = gif_durations(run / 'tsne.gif')
    glides = [tm.GLIDE_MS] * tm.GLIDE_FRAMES
    assert durations == [tm.HOLD_MS, *(glides + [tm.HOLD_MS]) * 4, *glides, tm.LAST_HOLD_MS]  # 6 held, glides between
    assert 900 <= size[0] <= 1000  # both panels read at their natural size in the README
    film = np.load(run / 'tsne.npz')
    assert film['embeddings'].shape == (6, 150, 2) and film['predictions'].shape == (6, 150)
    assert film['labels'].shape == (150,) and film['steps'].tolist() == [4, 8, 12, 16, 20, 24]
    assert len(features) == 6
    for name in ('tsne.png', 'curves.png', 'confusion.png', 'samples.png'):
        with Image.open(run / name) as picture:
            assert picture.format == 'PNG' and min(picture.size) > 200
    with Image.open(run / 'tsne.png') as picture:
        assert picture.size[0] >= 2 * size[0]
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


def test_no_tsne_never_imports_scikit_learn_or_pyplot(tmp_path, data_dir, fixture_checksums):
    """Nor does it look at MPLBACKEND, here a notebook's that cannot work: its pictures need no backend."""
    code = (f'code = tm.main(["--no-tsne", "--log-interval", "4", "--data-dir", {str(data_dir)!r}]); '
            'print(*(name in sys.modules for name in ("sklearn", "matplotlib.animation", "matplotlib.pyplot"))); '
            'sys.exit(code)')
    out = run_child(code, tmp_path, fixture_checksums, {'MPLBACKEND': 'module://matplotlib_inline.backend_inline'})
    assert out.returncode == 0 and out.stderr == '', out.stderr
    assert out.stdout.strip().splitlines()[-1] == 'False False False' and 'MPLBACKEND' not in out.stdout


def test_film_runs_without_a_display(tmp_path, data_dir, fixture_checksums):
    code = (f'sys.exit(tm.main(["--log-interval", "6", "--tsne-points", "100", "--data-dir", {str(data_dir)!r},'
            f' "--out-dir", "run"]))')
    out = run_child(code, tmp_path, fixture_checksums, {'MPLBACKEND': None, 'DISPLAY': None, 'WAYLAND_DISPLAY': None})
    assert out.returncode == 0, out.stderr
    assert 'Traceback' not in out.stderr
    durations, _ = gif_durations(tmp_path / 'run' / 'tsne.gif')
    assert len(durations) == 2 + tm.GLIDE_FRAMES


def test_film_survives_a_resume(tmp_path, data_dir, monkeypatch, capsys):
    run = tmp_path / 'run'
    assert tm.main([*TSNE_RUN, '--epochs', '1', '--data-dir', str(data_dir), '--out-dir', str(run)]) == 0
    assert tm.main(['--resume', str(run), '--epochs', '2']) == 0
    film = np.load(run / 'tsne.npz')
    assert film['steps'].tolist() == [4, 8, 12, 16, 20, 24] and film['predictions'].shape == (6, 150)
    durations, _ = gif_durations(run / 'tsne.gif')
    assert len(durations) == 6 + 5 * tm.GLIDE_FRAMES
    monkeypatch.setitem(sys.modules, 'sklearn.neighbors', None)  # a scikit-learn that fails to import (its numpy, say)
    capsys.readouterr()
    assert tm.main(['--resume', str(run)]) == 0  # its outputs written again: the film's figures without it
    summary = json.loads((run / 'summary.json').read_text())
    assert summary['tsne_frames'] == 6 and 'tsne_neighbour_agreement' not in summary
    assert 'summary.json has no neighbour agreement: scikit-learn fails to import' in capsys.readouterr().out


def test_a_film_resumed_with_other_tsne_points_says_it_starts_afresh(tmp_path, data_dir, capsys):
    run = tmp_path / 'run'
    assert tm.main([*TSNE_RUN, '--epochs', '1', '--data-dir', str(data_dir), '--out-dir', str(run)]) == 0
    capsys.readouterr()
    assert tm.main(['--resume', str(run), '--epochs', '2', '--tsne-points', '60']) == 0
    assert 't-SNE film: it now shows 60 points, where its frames so far show 150: it starts afresh' \
        in capsys.readouterr().out
    assert np.load(run / 'tsne.npz')['steps'].tolist() == [16, 20, 24]


def film_figure(labels, total_steps=100):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    figure = tm.FilmFigure(Figure(figsize=tm.FILM_INCHES, dpi=tm.FILM_DPI), labels, total_steps)
    FigureCanvasAgg(figure.fig)
    return figure


def test_a_frame_rings_the_misclassified_in_the_predicted_colour_and_counts_them():
    labels = np.arange(60) % 10
    predictions = labels.copy()
    predictions[[3, 17, 42]] = [5, 0, 9]
    embedding = np.random.default_rng(0).normal(size=(60, 2)).astype('float32')
    curves = [{'step': s, 'train_loss': 1 / s, 'eval_accuracy': 0.9} for s in (10, 20, 30)]
    figure = film_figure(labels)
    figure.draw(embedding, tm.layout_limits(embedding), predictions, 'Last layer, step 30', curves)
    assert figure.title.get_text() == ('Last layer, step 30\n3 of the 60 shown are misclassified, ringed in the '
                                       'colour of the class predicted')
    assert np.array_equal(figure.rings.get_offsets(), embedding[[3, 17, 42]])
    assert np.array_equal(figure.rings.get_edgecolors(), figure.colours[[5, 0, 9]])
    assert list(figure.loss_line.get_xdata()) == [10, 20, 30] and list(figure.acc_line.get_ydata()) == [0.9] * 3
    pixels = np.asarray(figure.fig.canvas.buffer_rgba())
    assert pixels.shape[:2] == (480, 960) and len(np.unique(pixels.reshape(-1, 4), axis=0)) > 20
    figure.draw(embedding, tm.layout_limits(embedding), labels, 'Last layer, step 40', curves)
    assert figure.title.get_text().endswith('0 of the 60 shown are misclassified')
    assert not len(figure.rings.get_offsets())


def test_glide_frames_are_interpolated_layouts(tmp_path):
    labels = np.arange(60) % 10
    metrics = [{'step': 10, 'train_loss': 1.0, 'eval_accuracy': 0.9}]
    film = tm.TsneFilm(labels, 1, str(tmp_path), {}, metrics, 100, background=False)
    rng = np.random.default_rng(0)
    film.embeddings = [rng.normal(size=(60, 2)).astype('float32') for _ in range(2)]
    film.steps, film.predictions, film.titles = [10, 20], [labels, labels], ['a', 'b']
    embedding, limits, _, title, curves = film.frame(0, towards=1, share=0.25)
    assert np.allclose(embedding, 0.75 * film.embeddings[0] + 0.25 * film.embeddings[1])
    assert np.allclose(limits, 0.75 * tm.layout_limits(film.embeddings[0])
                       + 0.25 * tm.layout_limits(film.embeddings[1]))
    assert title == 'a' and curves == metrics
    film.stop()


def as_if_a_window_were_shown(monkeypatch, interactive, kept=lambda: True):
    """The film's window up, as on a desktop, and a terminal behind it if `interactive`; returns the list that
    records `kept()` each time the last frame would be held open."""
    kept_open, real_init = [], tm.TsneFilm.__init__

    def init_as_if_a_window_were_shown(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.live = True
    monkeypatch.setattr(tm.TsneFilm, '__init__', init_as_if_a_window_were_shown)
    monkeypatch.setattr(tm, 'show_until_closed', lambda status: kept_open.append(kept()))
    monkeypatch.setattr(sys, 'stdin', type('Terminal', (), {'isatty': lambda self: interactive})())
    return kept_open


@pytest.mark.parametrize('interactive', [True, False])
def test_the_last_frame_stays_up_in_an_interactive_run_only(tmp_path, data_dir, monkeypatch, capsys, interactive):
    kept_open = as_if_a_window_were_shown(monkeypatch, interactive,
                                          lambda: (tmp_path / 'run' / 'summary.json').exists())
    assert tm.main([*TSNE_RUN, '--epochs', '1', '--data-dir', str(data_dir), '--out-dir', str(tmp_path / 'run')]) == 0
    assert kept_open == ([True] if interactive else [])
    assert ('the t-SNE window stays open on the last frame: close it to exit' in capsys.readouterr().out) == interactive


def test_a_finished_headless_run_resumed_with_the_film_says_no_step_is_left_to_film(tmp_path, data_dir, monkeypatch,
                                                                                    capsys):
    run = tmp_path / 'run'
    assert tm.main([*TSNE_RUN, '--no-tsne', '--data-dir', str(data_dir), '--out-dir', str(run)]) == 0
    kept_open = as_if_a_window_were_shown(monkeypatch, interactive=True)
    capsys.readouterr()
    assert tm.main(['--resume', str(run), '--tsne']) == 0
    assert kept_open == []  # no empty window held open
    assert 'note: the run has no step left to film; raise --epochs to film the steps added\n' in capsys.readouterr().out


def test_a_stop_signal_while_a_window_is_up_closes_it_and_all_ends_as_done(tmp_path, monkeypatch):
    """Tk's loop runs no Python until an event calls some: Ctrl-C was ignored until the mouse crossed the window."""
    import matplotlib.pyplot as plt
    from matplotlib.backend_bases import FigureCanvasBase
    timers, shown = [], []
    real_new_timer = FigureCanvasBase.new_timer
    monkeypatch.setattr(FigureCanvasBase, 'new_timer',
                        lambda self, **kwargs: timers.append(real_new_timer(self, **kwargs)) or timers[-1])

    def show(block=None):  # the window's loop: Ctrl-C, then the timer's next tick
        shown.append(plt.get_fignums())
        signal.raise_signal(signal.SIGINT)
        timers[0]._on_timer()
        shown.append(plt.get_fignums())
    monkeypatch.setattr(plt, 'show', show)
    Image.new('RGB', (120, 80), 'white').save(tmp_path / 'predictions.png')
    status = tm.Status()
    with tm.signals_handled(status):
        tm.show_until_closed(status, str(tmp_path / 'predictions.png'))
    assert len(shown[0]) == 1 and shown[1] == [] and status.signals == [signal.SIGINT]


def test_a_film_saved_before_mistakes_were_recorded_resumes(tmp_path, data_dir):
    """Checkpoints of the earlier film hold no predictions: their frames are drawn without rings."""
    import torch
    run = tmp_path / 'run'
    assert tm.main([*TSNE_RUN, '--epochs', '1', '--data-dir', str(data_dir), '--out-dir', str(run)]) == 0
    checkpoint = torch.load(run / 'model.pt', weights_only=True)
    del checkpoint['tsne']['predictions']
    torch.save(checkpoint, run / 'model.pt')
    assert tm.main(['--resume', str(run), '--epochs', '2']) == 0
    film = np.load(run / 'tsne.npz')
    assert film['steps'].tolist() == [4, 8, 12, 16, 20, 24]
    assert np.array_equal(film['predictions'][0], film['labels'])


@pytest.mark.parametrize('count', [3, 4, 11, 32])
def test_the_samples_grid_is_torchvisions_make_grid(count):
    from torchvision.utils import make_grid
    images = np.random.default_rng(0).integers(0, 256, (count, 28, 28), dtype=np.uint8)
    fig = tm.draw_samples(Figure(), images, list(range(count)), cols=4, gap=5)
    expected = make_grid(torch.from_numpy(images).unsqueeze(1), nrow=4, padding=5)[0].numpy()
    assert np.array_equal(np.asarray(fig.axes[0].images[0].get_array()), expected)


def test_every_label_of_the_pictures_lies_inside_them(tmp_path, monkeypatch):
    """Their margins are fixed: the widest labels a run can produce still fit."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    figures = {}
    real_save = tm.save_figure
    monkeypatch.setattr(tm, 'save_figure', lambda fig, path: (figures.update({os.path.basename(path): fig}),
                                                               real_save(fig, path)))
    steps = range(5000, 120001, 5000)
    metrics = [{'step': s, 'train_loss': 20 * 0.6 ** i, 'eval_accuracy': min(0.1 + i / 20, 1.0)}
               for i, s in enumerate(steps)]
    confusion = np.random.default_rng(0).integers(0, 10, (10, 10)) + np.diag([10000] * 10)
    images = np.random.default_rng(0).integers(0, 256, (32, 28, 28), dtype=np.uint8)
    tm.draw_pictures(tmp_path, metrics, confusion, images, list(range(10)) * 3 + [0, 1])
    assert sorted(figures) == ['confusion.png', 'curves.png', 'samples.png']
    for name, fig in figures.items():
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        renderer = canvas.get_renderer()
        for ax in fig.axes:  # its title, axis labels and the tick labels drawn
            box = ax.get_tightbbox(renderer)
            assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height, \
                (name, ax.get_title(), box)
        assert Image.open(tmp_path / name).size == (fig.bbox.width, fig.bbox.height)


# The film is a side channel: when it fails, training goes on

def test_closing_the_film_window_during_training_costs_nothing(tmp_path, data_dir, monkeypatch, capsys):
    import matplotlib.pyplot as plt
    monkeypatch.setattr(tm, 'interactive_backend', lambda log=None: True)  # a window (drawn by Agg here)
    monkeypatch.setattr(plt, 'show', lambda block=None: None)
    real_record, records = tm.Run.evaluate_and_record, []

    def record_then_close_the_window(self, *args):
        real_record(self, *args)
        records.append(1)
        if len(records) == 2:
            plt.close('all')  # as its close button or `q` does
    monkeypatch.setattr(tm.Run, 'evaluate_and_record', record_then_close_the_window)
    run = tmp_path / 'run'
    assert tm.main([*TSNE_RUN, '--data-dir', str(data_dir), '--out-dir', str(run)]) == 0
    out = capsys.readouterr().out
    assert out.count('the t-SNE window is gone (its window was closed); the film goes on into tsne.gif') == 1
    assert 'stays open' not in out and len(np.load(run / 'tsne.npz')['steps']) == 6


@pytest.mark.parametrize('good_frames, kept', [(1, 'tsne.gif keeps the frames made so far'),
                                               (0, 'no frame was made, so there is no tsne.gif')])
def test_a_dead_network_stops_the_film_not_the_run(tmp_path, good_frames, kept):
    """All features zero (every ReLU dead, as --lr 1 can leave them): scikit-learn's TSNE would crash the process."""
    code = ('import numpy as np, torch, train_mnist_cnn as tm\n'
            f'film = tm.TsneFilm(np.arange(100) % 10, 1, {str(tmp_path)!r}, {{}}, [], 10, False, print)\n'
            f'for step in range({good_frames}):\n'
            '    film.add_frame(torch.randn(100, 1568), torch.zeros(100, dtype=torch.long), 5, "first")\n'
            'film.add_frame(torch.zeros(100, 1568), torch.zeros(100, dtype=torch.long), 10, "dead", last=True)\n'
            'print(film.close().get("tsne_frames", 0))')
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, 'PYTHONPATH': ROOT, 'MPLBACKEND': 'Agg'})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [
        't-SNE film stopped: at step 10 all 100 filmed images have the same features (its ReLUs are dead: a lower '
        f'--lr trains); training goes on, and {kept}', str(good_frames)]
    assert (tmp_path / 'tsne.gif').exists() == bool(good_frames)


def test_a_backend_that_cannot_work_here_is_one_line_and_files_are_drawn(tmp_path, data_dir, fixture_checksums):
    """From a notebook, `!python train_mnist_cnn.py` inherits the notebook's MPLBACKEND."""
    backend = 'module://matplotlib_inline.backend_inline'
    code = (f'import sys, train_mnist_cnn as tm; tm.MNIST_MD5.update({fixture_checksums!r}); '
            'sys.exit(tm.main(sys.argv[1:]))')
    run = tmp_path / 'run'
    done = subprocess.run([sys.executable, '-c', code, *TSNE_RUN, '--epochs', '1', '--data-dir', str(data_dir),
                           '--out-dir', str(run)], capture_output=True, text=True, timeout=200,
                          env={**os.environ, 'PYTHONPATH': ROOT, 'MPLBACKEND': backend})
    assert done.returncode == 0 and done.stderr == ''
    assert f'matplotlib: MPLBACKEND={backend} cannot be used here (' in done.stdout
    assert 'drawing to files only' in done.stdout and 'Traceback' not in done.stdout
    assert {'curves.png', 'tsne.gif', 'summary.json'} <= set(os.listdir(run))


@pytest.mark.parametrize('backend', ['NoSuchBackend', 'QtAgg', 'module://json'])
def test_other_backends_that_cannot_work_here_are_one_line(backend):
    """A name matplotlib does not know; QtAgg without a Qt binding installed, a toolkit that cannot be imported, as
    TkAgg on a Python without tkinter; a module that is no backend."""
    done = subprocess.run([sys.executable, '-c', 'import train_mnist_cnn as tm; print(tm.interactive_backend())'],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, 'PYTHONPATH': ROOT, 'MPLBACKEND': backend})
    assert done.returncode == 0 and done.stderr == ''
    [line, live] = done.stdout.splitlines()
    assert line.startswith(f'matplotlib: MPLBACKEND={backend} cannot be used here (') and live == 'False'
    assert line.endswith('); drawing to files only')


@pytest.mark.skipif(ctypes.util.find_library('X11') is None, reason='Xlib, whose handler this is, is not installed')
@pytest.mark.parametrize('stage', ['training', 'outputs'])
def test_a_display_that_goes_away_saves_the_steps_and_releases_the_folder(tmp_path, data_dir, fixture_checksums,
                                                                         stage):
    """Xlib ends the process when the X server's connection is lost (ssh -X dropped): its handler saves first, or
    says that training is saved when it was."""
    code = (f'import sys, matplotlib.pyplot as plt, train_mnist_cnn as tm\ntm.MNIST_MD5.update({fixture_checksums!r})\n'
            'tm.interactive_backend = lambda log=None: True\nplt.show = lambda block=None: None\n'
            'real, calls = tm.Run.evaluate_and_record, []\n'
            'def record(self, *args):\n'
            '    real(self, *args)\n'
            '    calls.append(1)\n'
            '    if len(calls) == 2:\n'
            '        self.display_gone(None)  # as Xlib calls it\n'
            'def write_outputs(self, *args):\n'
            '    self.display_gone(None)\n'
            + ('tm.Run.evaluate_and_record = record\n' if stage == 'training' else
               'tm.Run.write_outputs = write_outputs\n') +
            'sys.exit(tm.main(sys.argv[1:]))\n')
    run = tmp_path / 'run'
    done = subprocess.run([sys.executable, '-c', code, *TSNE_RUN, '--data-dir', str(data_dir), '--out-dir', str(run)],
                          capture_output=True, text=True, timeout=200,
                          env={**os.environ, 'PYTHONPATH': ROOT, 'MPLBACKEND': 'Agg'})
    assert done.returncode == 1 and not (run / '.lock').exists()
    if stage == 'outputs':
        assert done.stderr.startswith('error: the display went away (its X server connection was lost); training is '
                                      'done and saved: write the outputs with: ')
        assert done.stderr.endswith(f'--resume {run}\n') and done.stderr.count('\n') == 1
        assert torch.load(run / 'model.pt', weights_only=True)['epoch'] == 2
        return
    assert done.stderr == ('error: the display went away (its X server connection was lost); training cannot go on '
                           'without it\n')
    assert 'checkpoint saved at step 8; resume with: ' in done.stdout
    assert torch.load(run / 'model.pt', weights_only=True)['step'] == 8 and not (run / '.lock').exists()


def test_a_stop_signal_that_a_toolkits_start_up_wraps_in_its_own_error_still_stops(tmp_path, data_dir, monkeypatch,
                                                                                   capsys):
    """A signal in the middle of a compiled module's start-up (matplotlib's ft2font, while pyplot is imported) comes
    back as that module's ImportError('initialization failed') from the Stopped: it was taken for a backend that
    cannot work here, and the stop was lost."""
    import matplotlib.pyplot as plt
    real_switch_backend = plt.switch_backend

    def interrupted(name):
        monkeypatch.setattr(plt, 'switch_backend', real_switch_backend)
        raise ImportError('initialization failed') from tm.Stopped(signal.SIGINT, tm.Stage.STARTING)
    monkeypatch.setattr(plt, 'switch_backend', interrupted)
    run = tmp_path / 'run'
    assert tm.main([*TSNE_RUN, '--data-dir', str(data_dir), '--out-dir', str(run)]) == 130
    assert capsys.readouterr().err == 'interrupted before training started; nothing was written\n'
    assert not run.exists()


def test_a_stop_signal_so_wrapped_while_the_pictures_are_drawn_ends_as_a_stop_there(tmp_path, data_dir, monkeypatch,
                                                                                    capsys):
    def interrupted(*args):  # matplotlib's compiled modules start up as the first picture is drawn
        raise ImportError('initialization failed') from tm.Stopped(signal.SIGINT, tm.Stage.OUTPUTS)
    monkeypatch.setattr(tm, 'draw_pictures', interrupted)
    run = tmp_path / 'run'
    assert tm.main(['--no-tsne', '--device', 'cpu', '--log-interval', '4', '--data-dir', str(data_dir), '--out-dir',
                    str(run)]) == 130
    assert capsys.readouterr().err.startswith(f'interrupted while writing the final outputs; training is done and '
                                              f'saved in {run}. Write them with: ')


def test_an_eval_subset_smaller_than_the_film_is_said_to_leave_it_fewer_points(tmp_path, data_dir, capsys):
    assert tm.main(['--device', 'cpu', '--log-interval', '12', '--eval-size', '60', '--tsne-points', '150',
                    '--data-dir', str(data_dir), '--out-dir', str(tmp_path / 'run')]) == 0
    assert ('note: the t-SNE film shows 60 points, the eval subset (--eval-size 60), not --tsne-points 150'
            in capsys.readouterr().out)
    with np.load(tmp_path / 'run' / 'tsne.npz') as film:
        assert film['embeddings'].shape[1] == 60
    assert tm.main(['--dry-run', '--eval-size', '60', '--data-dir', str(data_dir), '--out-dir',
                    str(tmp_path / 'dry')]) == 0
    assert capsys.readouterr().out.count('note: the t-SNE film shows 60 points') == 1  # (a dry run makes two runs)
