"""Never lose a run: atomic checkpoints, exact resume after SIGKILL, clean SIGINT/SIGTERM, clear bad input."""
import json
import os
import signal
import subprocess
import time

import pytest
import torch

import train_mnist_cnn as tm
from conftest import FAST, run_script

LONG = ['--no-tsne', '--device', 'cpu', '--epochs', '3', '--batch-size', '10', '--log-interval', '20',
        '--eval-size', '200']  # 60 steps an epoch, 180 in all


def final_state(run):
    checkpoint = torch.load(run / 'model.pt', weights_only=True)
    summary = json.loads((run / 'summary.json').read_text())
    return checkpoint, summary


def assert_same_run(a, b):
    (ckpt_a, summary_a), (ckpt_b, summary_b) = final_state(a), final_state(b)
    assert ckpt_a['model'].keys() == ckpt_b['model'].keys()
    for key in ckpt_a['model']:
        assert torch.equal(ckpt_a['model'][key], ckpt_b['model'][key]), key
    for key in ('test_accuracy', 'test_loss', 'steps', 'epochs'):
        assert summary_a[key] == summary_b[key], key
    assert [m['train_loss'] for m in ckpt_a['progress']['metrics']] == \
        [m['train_loss'] for m in ckpt_b['progress']['metrics']]


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, fixture_source):
    """The reference: the LONG run, never stopped."""
    base = tmp_path_factory.mktemp('reference')
    data = base / 'data' / 'MNIST' / 'raw'
    data.mkdir(parents=True)
    for name in fixture_source[1]:
        (data / name).write_bytes((fixture_source[0] / name).read_bytes())
    out = run_script([*LONG, '--data-dir', base / 'data', '--out-dir', base / 'run'], fixture_source[1])
    assert out.returncode == 0, out.stderr
    return base / 'data', base / 'run'


def wait_for(path, process, timeout=120):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, 'the run ended before it could be stopped'
        assert time.monotonic() < deadline
        time.sleep(0.002)


@pytest.mark.parametrize('checkpoints_before_kill', [1, 3])
def test_sigkill_then_resume_is_bit_identical(uninterrupted, tmp_path, fixture_checksums, checkpoints_before_kill):
    data, reference = uninterrupted
    run = tmp_path / 'run'
    process = run_script([*LONG, '--save-every', '7', '--data-dir', data, '--out-dir', run], fixture_checksums,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = 0
    while seen < checkpoints_before_kill:
        wait_for(run / 'model.pt', process)
        seen = torch.load(run / 'model.pt', weights_only=True)['step'] // 7
        time.sleep(0.001)
    process.kill()
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    stopped_at = torch.load(run / 'model.pt', weights_only=True)['step']
    assert 0 < stopped_at < 180 and not (run / 'summary.json').exists()

    assert tm.main(['--resume', str(run)]) == 0
    assert_same_run(run, reference)


@pytest.mark.parametrize('signum, code', [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_says_how_to_resume_and_resumes(uninterrupted, tmp_path, fixture_checksums, signum, code):
    data, reference = uninterrupted
    run = tmp_path / 'run'
    process = run_script([*LONG, '--save-every', '5', '--data-dir', data, '--out-dir', run], fixture_checksums,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(run / 'model.pt', process)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    assert 'Traceback' not in stderr
    assert 'checkpoint saved. Resume with:' in stdout and f'--resume {run}' in stdout
    assert 0 < torch.load(run / 'model.pt', weights_only=True)['step'] < 180

    assert tm.main(['--resume', str(run / 'model.pt')]) == 0
    assert_same_run(run, reference)


def test_resume_can_raise_epochs_and_appends_metrics(tmp_path, data_dir):
    run = tmp_path / 'run'
    assert tm.main([*FAST, '--data-dir', str(data_dir), '--out-dir', str(run)]) == 0
    assert tm.main(['--resume', str(run), '--epochs', '2']) == 0
    checkpoint, summary = final_state(run)
    assert summary['epochs'] == 2 and summary['steps'] == 24 and checkpoint['epoch'] == 2
    rows = (run / 'metrics.csv').read_text().splitlines()
    assert len(rows) == 1 + 6 and rows[-1].startswith('2,24,')


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, data_dir, monkeypatch, capsys):
    run = tmp_path / 'run'
    saves = []
    real_fsync = os.fsync

    def fsync_that_dies_on_the_second_checkpoint(fd):
        if os.readlink(f'/proc/self/fd/{fd}').endswith('.tmp-model.pt'):
            saves.append(fd)
            if len(saves) == 2:
                raise OSError(28, 'No space left on device')
        real_fsync(fd)
    monkeypatch.setattr(os, 'fsync', fsync_that_dies_on_the_second_checkpoint)
    assert tm.main([*FAST, '--save-every', '3', '--data-dir', str(data_dir), '--out-dir', str(run)]) == 1
    assert 'No space left on device' in capsys.readouterr().err
    assert torch.load(run / 'model.pt', weights_only=True)['step'] == 3
    assert not [p for p in os.listdir(run) if p.startswith('.tmp')]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_dir, monkeypatch, capsys):
    real_step = tm.train_step
    steps = []

    def step_that_diverges(*args):
        steps.append(1)
        loss = real_step(*args)
        return loss * float('nan') if len(steps) > 5 else loss
    monkeypatch.setattr(tm, 'train_step', step_that_diverges)
    run = tmp_path / 'run'
    assert tm.main([*FAST, '--save-every', '4', '--data-dir', str(data_dir), '--out-dir', str(run)]) == 1
    err = capsys.readouterr().err
    assert 'loss is no longer finite at step 8' in err and 'try a lower --lr' in err
    assert torch.load(run / 'model.pt', weights_only=True)['step'] == 4


def write_other_model(path):
    torch.save({'model': torch.nn.Linear(3, 2).state_dict(), 'optimizer': {}, 'progress': {}, 'rng': {},
                'config': {}, 'epoch': 0, 'step': 0}, path)


@pytest.mark.parametrize('make, message', [
    (lambda p: None, 'no checkpoint at'),
    (lambda p: p.write_bytes(os.urandom(4096)), 'is not a readable checkpoint'),
    (lambda p: p.write_bytes(b''), 'is not a readable checkpoint'),
    (lambda p: torch.save({'weights': torch.zeros(3)}, p), 'is not a checkpoint of this script'),
    (write_other_model, 'holds a different model'),
])
def test_bad_resume_is_one_line_and_exit_1(tmp_path, make, message, capsys):
    path = tmp_path / 'model.pt'
    make(path)
    before = path.read_bytes() if path.exists() else None
    assert tm.main(['--resume', str(path)]) == 1
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1 and message in captured.err
    assert 'Traceback' not in captured.out + captured.err
    assert (path.read_bytes() if path.exists() else None) == before


def test_truncated_checkpoint_is_refused(tmp_path, data_dir, capsys):
    run = tmp_path / 'run'
    assert tm.main([*FAST, '--data-dir', str(data_dir), '--out-dir', str(run)]) == 0
    data = (run / 'model.pt').read_bytes()
    (run / 'model.pt').write_bytes(data[:len(data) // 2])
    assert tm.main(['--resume', str(run)]) == 1
    assert 'is not a readable checkpoint' in capsys.readouterr().err


@pytest.mark.parametrize('flags, message', [
    (['--batch-size', '20'], '--batch-size 20 differs'),
    (['--seed', '9'], '--seed 9 differs'),
    (['--lr', '0.01'], '--lr 0.01 differs'),
])
def test_resume_refuses_flags_that_change_the_run(tmp_path, data_dir, capsys, flags, message):
    run = tmp_path / 'run'
    assert tm.main([*FAST, '--epochs', '2', '--data-dir', str(data_dir), '--out-dir', str(run)]) == 0
    before = (run / 'model.pt').read_bytes()
    capsys.readouterr()
    assert tm.main(['--resume', str(run), *flags]) == 2
    assert message in capsys.readouterr().err
    assert (run / 'model.pt').read_bytes() == before


def test_resume_cannot_lower_epochs_below_those_done(tmp_path, data_dir, capsys):
    run = tmp_path / 'run'
    assert tm.main([*FAST, '--epochs', '2', '--data-dir', str(data_dir), '--out-dir', str(run)]) == 0
    assert tm.main(['--resume', str(run), '--epochs', '1']) == 2
    assert 'below the 2 epochs already trained' in capsys.readouterr().err


def test_resume_of_a_bare_file_name_continues_in_the_current_folder(tmp_path, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tm.main([*FAST, '--data-dir', str(data_dir), '--out-dir', '.']) == 0
    assert tm.main(['--resume', 'model.pt', '--epochs', '2']) == 0
    assert json.loads((tmp_path / 'summary.json').read_text())['steps'] == 24
    assert not (tmp_path / 'runs').exists()


def test_ctrl_c_before_training_is_one_line_and_exit_130(tmp_path, data_dir, monkeypatch, capsys):
    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(tm, 'ensure_mnist', interrupted)
    assert tm.main([*FAST, '--data-dir', str(data_dir), '--out-dir', str(tmp_path / 'run')]) == 130
    captured = capsys.readouterr()
    assert captured.err.strip() == 'interrupted before training started; nothing was written'
