"""Training on the fixture: loss goes down, the three outputs carry their keys, runs are reproducible."""
import csv
import errno
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import types
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import train_mnist_cnn as tm
from conftest import FAST, ROOT, SCRIPT, run_script, without_package


@pytest.fixture
def finished_run(tmp_path, data_dir):
    out = tmp_path / 'run'
    assert tm.main([*FAST, '--epochs', '2', '--batch-size', '20', '--data-dir', str(data_dir),
                    '--out-dir', str(out)]) == 0
    return out


def test_run_lowers_the_loss_and_writes_three_outputs(finished_run):
    with open(finished_run / 'metrics.csv') as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ['epoch', 'step', 'train_loss', 'eval_accuracy', 'elapsed_seconds']
    assert len(rows) == 2 * 30 // 4  # 30 steps an epoch, a row every 4 steps
    assert float(rows[-1]['train_loss']) < float(rows[0]['train_loss']) / 2
    assert float(rows[-1]['eval_accuracy']) > 0.9

    summary = json.loads((finished_run / 'summary.json').read_text())
    for key in ('test_accuracy', 'test_loss', 'epochs', 'steps', 'train_seconds', 'wall_seconds', 'device',
                'seed', 'torch_version', 'config'):
        assert key in summary
    assert summary['epochs'] == 2 and summary['steps'] == 60 and summary['device'] == 'cpu'
    assert summary['test_accuracy'] > 0.9 and summary['config']['batch_size'] == 20

    checkpoint = torch.load(finished_run / 'model.pt', weights_only=True)
    assert {'model', 'optimizer', 'epoch', 'step', 'config'} <= checkpoint.keys()
    assert checkpoint['epoch'] == 2 and checkpoint['step'] == 60
    model = tm.CNN()
    model.load_state_dict(checkpoint['model'])


def test_log_lines_show_progress(tmp_path, data_dir, capsys):
    assert tm.main([*FAST, '--data-dir', str(data_dir), '--out-dir', str(tmp_path / 'run')]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == 'device: cpu'
    assert 'step     4/12 | loss ' in out and 'eval acc' in out and 'img/s' in out
    assert 'epoch  1/1 done | test loss' in out
    assert 'prediction number' in out and 'real number' in out


def test_a_log_interval_longer_than_the_run_is_said_at_the_start(tmp_path, data_dir, capsys):
    """Else the run ends with no log line, no metrics row and no film, and nothing says why; a resumed run too."""
    flags = [*FAST, '--log-interval', '13', '--data-dir', str(data_dir)]  # 12 steps an epoch
    assert tm.main([*flags, '--out-dir', str(tmp_path / 'run')]) == 0
    out = capsys.readouterr().out
    assert "note: --log-interval 13 leaves no log step in the run's 12 steps to go: no step's line or metrics row " \
           'will be made' in out and '| step ' not in out
    assert tm.main([*flags, '--epochs', '2', '--out-dir', str(tmp_path / 'longer')]) == 0
    assert 'note: --log-interval' not in capsys.readouterr().out
    assert tm.main(['--resume', str(tmp_path / 'longer'), '--epochs', '3', '--log-interval', '100']) == 0
    assert "note: --log-interval 100 leaves no log step in the run's 12 steps to go" in capsys.readouterr().out
    assert tm.main(['--resume', str(tmp_path / 'longer')]) == 0  # nothing to go: nothing to say
    assert 'note: --log-interval' not in capsys.readouterr().out


def test_same_seed_gives_the_same_run(tmp_path, data_dir):
    results = []
    for name in ('a', 'b'):
        assert tm.main([*FAST, '--seed', '7', '--data-dir', str(data_dir), '--out-dir', str(tmp_path / name)]) == 0
        results.append(json.loads((tmp_path / name / 'summary.json').read_text())['test_accuracy'])
    assert results[0] == results[1]
    a, b = (torch.load(tmp_path / n / 'model.pt', weights_only=True)['model'] for n in 'ab')
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_default_out_dir_is_new_for_every_run(tmp_path, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert tm.main([*FAST, '--data-dir', str(data_dir)]) == 0
    runs = sorted((tmp_path / 'runs').iterdir())
    assert len(runs) == 2 and all((r / 'summary.json').exists() for r in runs)


def test_epoch_order_is_the_tutorial_dataloaders_order():
    """Same seed, same batches as torch.utils.data.DataLoader(shuffle=True) after the model is built."""
    torch.manual_seed(3)
    tm.CNN()
    ours = [tm.epoch_order(tm.draw_epoch_seed(), 100) for _ in range(2)]
    torch.manual_seed(3)
    tm.CNN()
    loader = torch.utils.data.DataLoader(range(100), batch_size=100, shuffle=True)
    theirs = [next(iter(loader)) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_train_step_never_waits_for_the_device(monkeypatch):
    """No host sync in the hot loop: the step may not read a value back."""
    model = tm.CNN()
    optimizer = tm.Adam(model.parameters(), 0.001)
    images, labels = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8), torch.arange(8)
    step_counts = [state['step'] for state in optimizer.state]  # torch's Adam reads these: they live on the host

    def refusing(read):
        def refuse(tensor, *args):
            if not any(tensor is count for count in step_counts):
                raise AssertionError('host sync in train_step')
            return read(tensor, *args)
        return refuse
    for name in ('item', 'tolist', '__bool__', '__float__', '__int__'):
        monkeypatch.setattr(torch.Tensor, name, refusing(getattr(torch.Tensor, name)))
    loss = tm.train_step(model, optimizer, images, labels, len(labels), 1)
    monkeypatch.undo()
    assert loss.shape == () and loss.item() > 0


def test_eval_batches_cover_every_image():
    model = tm.CNN()
    images = torch.randint(0, 256, (1234, 1, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (1234,))
    result = tm.evaluate(model, images, labels, keep_features=600)
    assert result.predictions.shape == (1234,) and result.features.shape == (600, 1568)
    with torch.no_grad():
        logits, _ = model(images.float() / 255)
    assert torch.equal(result.predictions, logits.argmax(1))
    assert result.accuracy == pytest.approx((logits.argmax(1) == labels).float().mean().item())


@pytest.fixture
def native_bf16(monkeypatch):
    """A CPU that reports native bfloat16, whatever this one has: autocast itself runs anywhere."""
    monkeypatch.setattr(torch.cpu, 'get_capabilities', lambda: {'avx512_bf16': True}, raising=False)


def test_bf16_trains_keeps_fp32_checkpoints_and_resumes_across_precisions(tmp_path, data_dir, native_bf16, capsys):
    run = tmp_path / 'run'
    assert tm.main([*FAST, '--precision', 'bf16', '--data-dir', str(data_dir), '--out-dir', str(run)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == 'device: cpu, bf16 autocast'
    summary = json.loads((run / 'summary.json').read_text())
    assert summary['test_accuracy'] > 0.9 and summary['config']['precision'] == 'bf16'
    checkpoint = torch.load(run / 'model.pt', weights_only=True)
    assert {t.dtype for t in checkpoint['model'].values()} == {torch.float32}
    assert tm.main(['--resume', str(run), '--epochs', '2', '--precision', 'fp32']) == 0
    assert json.loads((run / 'summary.json').read_text())['config']['precision'] == 'fp32'
    assert tm.main(['--resume', str(run), '--epochs', '3', '--precision', 'bf16']) == 0
    assert json.loads((run / 'summary.json').read_text())['steps'] == 36


def test_bf16_step_computes_in_bf16_and_updates_fp32_weights():
    model = tm.CNN()
    optimizer = tm.Adam(model.parameters(), 0.001)
    images, labels = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8), torch.arange(8)
    seen = []
    model.out.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    before = model.out.weight.detach().clone()
    loss = tm.train_step(model, optimizer, images, labels, 8, 1, 'bf16')
    assert seen == [torch.bfloat16] and loss.dtype == torch.float32
    assert model.out.weight.dtype == torch.float32 and not torch.equal(model.out.weight, before)


@pytest.mark.parametrize('capabilities, device, message', [
    ({'avx2': True}, 'cpu', 'this CPU has no native bfloat16'),
    ({'avx512_bf16': True}, 'mps', 'not on mps'),
])
def test_bf16_where_the_chip_has_none_is_a_usage_error(monkeypatch, tmp_path, capsys, capabilities, device, message):
    monkeypatch.setattr(torch.cpu, 'get_capabilities', lambda: capabilities, raising=False)
    monkeypatch.setattr(torch.backends.mps, 'is_available', lambda: device == 'mps')
    assert tm.main(['--precision', 'bf16', '--device', device, '--no-tsne', '--out-dir', str(tmp_path / 'run')]) == 2
    err = capsys.readouterr().err
    assert err.startswith('usage error: --precision bf16') and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / 'run').exists()



@pytest.mark.parametrize('capabilities, measured', [({'avx2': True}, ('fp32',)),
                                                     ({'avx512_bf16': True}, ('fp32', 'bf16'))])
def test_the_benchmark_times_bf16_only_where_the_script_takes_it(monkeypatch, capsys, capabilities, measured):
    """On a CPU without native bfloat16 the benchmark ended at its first bf16 run, which the script refused."""
    import benchmark
    monkeypatch.setattr(torch.cpu, 'get_capabilities', lambda: capabilities, raising=False)
    assert benchmark.precisions('cpu') == measured
    assert ('bf16 left out (--precision bf16: this CPU has no native bfloat16' in capsys.readouterr().out) == (
        measured == ('fp32',))

def test_the_benchmark_measures_the_bf16_peak_only_where_it_times_bf16():
    """Emulated, the bf16 matmul took minutes on such a CPU, with nothing printed, for a peak that meant nothing."""
    import benchmark
    assert set(benchmark.matmul_peak('cpu', ('fp32',), size=64, seconds=0.01)) == {'fp32'}


BENCHMARK = os.path.join(ROOT, 'tests', 'benchmark.py')


@pytest.mark.parametrize('args, code, message', [
    (['--seeds', '-1'], 2, 'argument --seeds: must be 1 or more, got -1'),
    (['--film', '--repeats', '0'], 2, 'argument --repeats: must be 1 or more, got 0'),
    (['--predict', 'nowhere', '--data-dir', 'nowhere'], 1, 'benchmark: MNIST is not available. Tried:'),
])
def test_the_benchmarks_refusals_are_a_line_not_a_traceback(tmp_path, args, code, message):
    out = subprocess.run([sys.executable, BENCHMARK, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == code and message in out.stderr and 'Traceback' not in out.stderr


@pytest.mark.parametrize('stop, code, err', [('os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)', 143, ''),
                                             ('raise KeyboardInterrupt', 130, 'benchmark: interrupted\n')])
def test_a_stopped_benchmark_leaves_no_run_folder_behind(tmp_path, stop, code, err):
    """SIGTERM (timeout, kill, a CI's limit) left the runs it had made in its temporary folder."""
    scratch = tmp_path / 'tmp'
    scratch.mkdir()
    program = ('import os, signal, sys, time, benchmark\n'
               'def timed(command):  # the first run has written its folder when the stop comes\n'
               '    os.makedirs(command[command.index("--out-dir") + 1])\n'
               f'    {stop}\n'
               'benchmark.timed = timed\n'
               'sys.argv = ["benchmark.py", "--film", "--repeats", "1"]\n'
               'benchmark.run_as_script()\n')
    out = subprocess.run([sys.executable, '-c', program], capture_output=True, text=True, timeout=120,
                         env={**os.environ, 'TMPDIR': str(scratch), 'PYTHONPATH': os.path.join(ROOT, 'tests')})
    assert (out.returncode, out.stderr) == (code, err) and list(scratch.iterdir()) == []


def steps_of(optimizer, model, batches):
    for images, labels in batches:
        tm.train_step(model, optimizer, images, labels, len(labels), 1)
    return [p.detach().clone() for p in model.parameters()]


def test_adam_is_torch_optim_adam_bit_for_bit_and_their_state_dicts_interchange():
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8, generator=generator),
                torch.randint(0, 10, (16,), generator=generator)) for _ in range(12)]
    torch.manual_seed(1)
    ours_model = tm.CNN()
    theirs_model = tm.CNN()
    theirs_model.load_state_dict(ours_model.state_dict())
    ours = tm.Adam(ours_model.parameters(), 0.003)
    theirs = torch.optim.Adam(theirs_model.parameters(), lr=0.003, foreach=False)
    assert all(torch.equal(a, b) for a, b in zip(steps_of(ours, ours_model, batches[:6]),
                                                 steps_of(theirs, theirs_model, batches[:6])))
    # each takes the other's state and goes on as the other would have
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    ours.load_state_dict(theirs_state)
    theirs.load_state_dict(ours_state)
    assert ours.state[0]['step'].item() == 6 and theirs.state_dict()['param_groups'][0]['lr'] == 0.003
    assert all(torch.equal(a, b) for a, b in zip(steps_of(ours, ours_model, batches[6:]),
                                                 steps_of(theirs, theirs_model, batches[6:])))


def test_a_training_run_never_imports_torch_dynamo(tmp_path, data_dir, fixture_checksums):
    """torch.optim's first step imports torch._dynamo, two seconds of start-up here that training never uses."""
    code = ('import sys, train_mnist_cnn as tm; '
            f'tm.MNIST_MD5.update({fixture_checksums!r}); code = tm.main(sys.argv[1:]); '
            'print("imported:", *sorted(m for m in sys.modules if m.startswith("torch._dynamo"))); sys.exit(code)')
    args = ['--epochs', '1', '--log-interval', '10', '--tsne-points', '100', '--data-dir', data_dir,
            '--out-dir', tmp_path / 'run']
    done = subprocess.run([sys.executable, '-c', code, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, 'PYTHONPATH': ROOT, 'MPLBACKEND': 'Agg'}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert 'test accuracy' in done.stdout and (tmp_path / 'run' / 'tsne.gif').exists()
    assert done.stdout.splitlines()[-1] == 'imported:'


def page_faults_a_step(keep):
    """Minor page faults of a warmed-up training step (batch 50), in a fresh process: memory the step asked the
    OS for afresh and touched for the first time."""
    code = ('import resource, torch, train_mnist_cnn as tm\n'
            f'if {keep}: tm.keep_freed_memory()\n'
            'cpu = torch.device("cpu")\n'
            'model = tm.to_device(tm.CNN(), cpu)\n'
            'optimizer = tm.Adam(model.parameters(), 0.001)\n'
            'images, labels = torch.randint(0, 256, (50, 1, 28, 28), dtype=torch.uint8), torch.arange(50) % 10\n'
            'for step in range(30):\n'
            '    if step == 10: before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n'
            '    tm.train_step(model, optimizer, images, labels, 50, 1)\n'
            'print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)')
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, 'PYTHONPATH': ROOT})
    assert done.returncode == 0, done.stderr
    return float(done.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc' or 'LD_PRELOAD' in os.environ,
                    reason="glibc's own malloc only")
def test_a_training_step_reuses_its_memory_instead_of_page_faulting_it_in():
    kept, default = page_faults_a_step(True), page_faults_a_step(False)
    assert kept * 8 < default, (kept, default)  # here: 0-61 against 970-3650 a step


def test_training_keeps_freed_memory(tmp_path, data_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(tm, 'keep_freed_memory', lambda: calls.append(1))
    assert tm.main([*FAST, '--data-dir', str(data_dir), '--out-dir', str(tmp_path / 'run')]) == 0
    assert calls == [1]


# Side channels: printing may fail; training and its files may not

def test_stdout_on_a_full_disk_is_one_line_and_the_run_completes(tmp_path, data_dir, fixture_checksums):
    run = tmp_path / 'run'
    with open('/dev/full', 'w') as full:
        process = run_script([*FAST, '--data-dir', data_dir, '--out-dir', run], fixture_checksums, stdout=full,
                             stderr=subprocess.PIPE, text=True)
        _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0
    assert stderr == 'stdout failed (No space left on device); the run goes on without printing its progress\n'
    assert (run / 'summary.json').exists()


@pytest.mark.parametrize('closed', [1, 2])
def test_a_closed_stdout_or_stderr_costs_nothing(tmp_path, data_dir, fixture_checksums, closed):
    """`python train_mnist_cnn.py >&-` (or `2>&-`): Python's sys.stdout (sys.stderr) is None."""
    run = tmp_path / 'run'
    process = run_script([*FAST, '--lr', 'x' if closed == 2 else '0.001', '--data-dir', data_dir, '--out-dir', run],
                         fixture_checksums, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=lambda: os.close(closed))
    out, err = process.communicate(timeout=120)
    assert process.returncode == (2 if closed == 2 else 0) and b'Traceback' not in out + err
    assert (out if closed == 2 else err) == b''  # where a line could go, it went; a usage error has nowhere to go
    assert (run / 'summary.json').exists() == (closed == 1)


@pytest.mark.parametrize('hangup', [False, True])
def test_a_terminal_closed_under_a_background_run_costs_nothing(tmp_path, data_dir, fixture_checksums, hangup):
    """`python train_mnist_cnn.py &`, then the terminal window closed: the next print meets EIO; where the shell
    passes its SIGHUP on, the run saves and stops with 129."""
    pty = pytest.importorskip('pty', reason='a POSIX terminal')  # (imported here: Windows has none, nor termios)
    run = tmp_path / 'run'
    terminal, tty = pty.openpty()
    process = run_script([*FAST, '--epochs', '3', '--batch-size', '10', '--data-dir', data_dir, '--out-dir', run],
                         fixture_checksums, stdout=tty, stderr=tty,
                         preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    os.close(tty)
    printed = b''
    while b'| step ' not in printed:  # training has begun
        printed += os.read(terminal, 1000)
    os.close(terminal)  # the terminal is gone: its pty answers EIO
    if hangup:
        process.send_signal(signal.SIGHUP)
    assert process.wait(timeout=120) == (129 if hangup else 0)
    checkpoint = torch.load(run / 'model.pt', weights_only=True)
    assert checkpoint['epoch'] == 3 and (run / 'summary.json').exists() if not hangup else checkpoint['step'] > 0


@pytest.mark.parametrize('flags, failing_step', [(FAST, 7), (['--dry-run', '--no-tsne'], 2)])
def test_running_out_of_memory_is_one_line_and_keeps_the_steps_trained(tmp_path, data_dir, monkeypatch, capsys,
                                                                       flags, failing_step):
    """In a dry run's first epoch too, before the checkpoint it resumes from."""
    real_step, steps = tm.train_step, []

    def step_that_runs_out_of_memory(*args):
        steps.append(1)
        if len(steps) == failing_step:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 96000000 bytes.")
        return real_step(*args)
    monkeypatch.setattr(tm, 'train_step', step_that_runs_out_of_memory)
    run = tmp_path / 'run'
    assert tm.main([*flags, '--data-dir', str(data_dir), '--out-dir', str(run)]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith('error: out of memory (DefaultCPUAllocator: ') and captured.err.count('\n') == 1
    assert captured.err.endswith('; free some memory and resume, or start anew with a lower --batch-size (a resumed '
                                 'run keeps its own)\n')
    assert f'checkpoint saved at step {failing_step - 1}' in captured.out
    assert torch.load(run / 'model.pt', weights_only=True)['step'] == failing_step - 1
    monkeypatch.setattr(tm, 'train_step', real_step)
    assert tm.main(['--resume', str(run)]) == 0


def test_images_a_second_counts_the_images_trained(tmp_path, data_dir):
    """At --batch-size 599 an epoch of the fixture's 600 images is a step of 599 and a step of 1."""
    run = tmp_path / 'run'
    assert tm.main([*FAST, '--batch-size', '599', '--data-dir', str(data_dir), '--out-dir', str(run)]) == 0
    summary = json.loads((run / 'summary.json').read_text())
    assert summary['steps'] == 2
    assert summary['images_per_second'] * summary['train_seconds'] == pytest.approx(600, rel=0.01)


# A dry run, time left, TensorBoard

def test_a_dry_run_runs_every_stage_in_a_folder_of_its_own(tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert tm.main(['--dry-run', '--device', 'cpu', '--data-dir', str(data_dir)]) == 0
    out = capsys.readouterr().out
    [run] = (tmp_path / 'runs').iterdir()
    assert {'model.pt', 'metrics.csv', 'summary.json', 'curves.png', 'confusion.png', 'samples.png', 'tsne.gif',
            'tsne.npz', 'tsne.png'} <= set(os.listdir(run))
    assert f'dry run: resuming from {run.relative_to(tmp_path)}/model.pt' in out and 'dry run done:' in out
    summary = json.loads((run / 'summary.json').read_text())
    assert summary['dry_run'] is True and summary['epochs'] == 2 and summary['steps'] == 4
    with open(run / 'metrics.csv') as f:
        assert [int(row['step']) for row in csv.DictReader(f)] == [1, 2, 3, 4]
    assert len(np.load(run / 'tsne.npz')['steps']) == 4


def test_a_dry_run_whose_batch_takes_all_the_images_runs_one_step_an_epoch(tmp_path, data_dir):
    run = tmp_path / 'run'
    assert tm.main(['--dry-run', '--no-tsne', '--batch-size', '600', '--data-dir', str(data_dir), '--out-dir',
                    str(run)]) == 0
    assert json.loads((run / 'summary.json').read_text())['steps'] == 2


@pytest.mark.parametrize('resume', [False, True])
def test_a_dry_run_refuses_the_flags_it_sets_itself(tmp_path, data_dir, capsys, resume):
    run = tmp_path / 'run'
    if resume:
        assert tm.main(['--dry-run', '--no-tsne', '--data-dir', str(data_dir), '--out-dir', str(run)]) == 0
        capsys.readouterr()
    start = ['--resume', str(run)] if resume else ['--dry-run', '--data-dir', str(data_dir), '--out-dir', str(run)]
    assert tm.main([*start, '--epochs', '5']) == 2
    assert capsys.readouterr().err == ('usage error: --epochs 5: a dry run sets it itself (two epochs of two steps, '
                                       'a line and a frame each step, a film of 100 points)\n')


def test_a_dry_run_does_not_resume_a_real_run(finished_run, capsys):
    assert tm.main(['--resume', str(finished_run), '--dry-run']) == 2
    assert capsys.readouterr().err == 'usage error: --dry-run starts a run of its own; leave --resume out\n'


def test_each_log_line_says_the_time_left_in_under_100_characters(tmp_path, data_dir, capsys, monkeypatch):
    clock = [0.0]  # the run's clock, moved 1 s by each step and 0.5 s by each evaluation: the figures are exact

    def taking(seconds, function):
        def timed(*args, **kwargs):
            clock[0] += seconds
            return function(*args, **kwargs)
        return timed
    monkeypatch.setattr(tm.time, 'perf_counter', lambda: clock[0])
    monkeypatch.setattr(tm, 'train_step', taking(1, tm.train_step))
    monkeypatch.setattr(tm, 'evaluate', taking(0.5, tm.evaluate))
    assert tm.main([*FAST, '--epochs', '3', '--data-dir', str(data_dir), '--out-dir', str(tmp_path / 'run')]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if ' | step ' in line]
    assert len(lines) == 9 and all(len(line) < 100 for line in lines)
    left = [int(m) * 60 + int(s) for m, s in (re.search(r' \| eta (\d+):(\d\d)$', line).groups() for line in lines)]
    assert left[0] == 32 + 8 * 0.5  # 32 steps to go at 1 s, and 8 lines to go with an evaluation each
    assert left == sorted(left, reverse=True) and left[-1] == 0
    assert [tm.clock(s) for s in (0, 12, 599, 3599, 3600, 25 * 3600 + 61)] == [
        '0:00', '0:12', '9:59', '59:59', '1:00:00', '25:01:01']  # a long run's hours, as tqdm shows them


def scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder), size_guidance={'scalars': 0, 'tensors': 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()['scalars']}


def images(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder), size_guidance={'images': 0})
    events.Reload()
    return {tag: [(e.step, e.encoded_image_string) for e in events.Images(tag)] for tag in events.Tags()['images']}


def test_tensorboard_holds_the_metrics_rows_and_the_projectors_features(tmp_path, data_dir):
    run = tmp_path / 'run'
    assert tm.main([*FAST, '--tensorboard', '--tsne-points', '60', '--data-dir', str(data_dir),
                    '--out-dir', str(run)]) == 0
    assert tm.main(['--resume', str(run), '--epochs', '2']) == 0  # appended to, no step twice
    assert tm.main(['--resume', str(run)]) == 0  # a finished run's outputs written again: no step twice either
    assert tm.main(['--resume', str(run), '--no-tensorboard']) == 0  # nor after a resume without it
    assert tm.main(['--resume', str(run), '--tensorboard']) == 0
    with open(run / 'metrics.csv') as f:
        rows = list(csv.DictReader(f))
    board = scalars(run)
    for tag, points in {**board, **images(run)}.items():
        assert len({step for step, _ in points}) == len(points), tag
    assert [step for step, _ in board['hparam/test_accuracy']] == [12, 24]
    for tag, column in (('train/loss', 'train_loss'), ('eval/accuracy', 'eval_accuracy')):
        assert [step for step, _ in board[tag]] == [int(row['step']) for row in rows]
        assert [value for _, value in board[tag]] == pytest.approx([float(row[column]) for row in rows], rel=1e-6)
    assert {'eval/loss', 'train/images_per_second', 'test/accuracy', 'hparam/test_accuracy'} <= board.keys()
    assert board['test/accuracy'][-1] == (24, pytest.approx(json.loads((run / 'summary.json').read_text())
                                                            ['test_accuracy']))
    from google.protobuf import text_format
    from tensorboard.plugins import projector
    config = text_format.Parse((run / 'projector_config.pbtxt').read_text(), projector.ProjectorConfig())
    [embedding] = config.embeddings  # the final model's, at step 24
    features = np.loadtxt(run / embedding.tensor_path, delimiter='\t')
    labels = [int(label) for label in (run / embedding.metadata_path).read_text().split()]
    test_labels = tm.load_mnist(str(data_dir), False, tm.World(), print)['test_labels'][:60].tolist()
    assert embedding.tensor_path == '00024/features/tensors.tsv' and features.shape == (60, 1568)
    assert labels == test_labels and list(embedding.sprite.single_image_dim) == [28, 28]
    with Image.open(run / embedding.sprite.image_path) as sprite:
        assert sprite.size == (8 * 28, 8 * 28)  # 60 digits in rows of 8


def test_tensorboards_end_is_found_whatever_separator_the_projector_wrote(tmp_path):
    """On Windows the projector's paths read 00012/features\\tensors.tsv; its tensor's name is the same everywhere."""
    (tmp_path / 'summary.json').write_text('{"steps": 12}')
    (tmp_path / 'projector_config.pbtxt').write_text(
        'embeddings {\n  tensor_name: "features:00012"\n  tensor_path: "00012/features\\\\tensors.tsv"\n}\n')
    run = types.SimpleNamespace(out_dir=str(tmp_path), progress=tm.Progress(step=12))
    assert tm.Run.board_holds_the_end(run)
    run.progress.step = 24  # (a later step: its end is not written yet)
    assert not tm.Run.board_holds_the_end(run)


@pytest.mark.parametrize('piped', ['summary.json', 'projector_config.pbtxt'])
def test_a_named_pipe_in_place_of_tensorboards_end_is_no_end_and_hangs_nothing(tmp_path, piped):
    (tmp_path / 'summary.json').write_text('{"steps": 12}')
    (tmp_path / 'projector_config.pbtxt').write_text('embeddings {\n  tensor_name: "features:00012"\n}\n')
    (tmp_path / piped).unlink()
    os.mkfifo(tmp_path / piped)
    run, answer = types.SimpleNamespace(out_dir=str(tmp_path), progress=tm.Progress(step=12)), []
    reader = threading.Thread(target=lambda: answer.append(tm.Run.board_holds_the_end(run)), daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert answer == [False]


def test_tensorboard_missing_is_one_line_with_the_install_command(tmp_path, monkeypatch, capsys):
    without_package(monkeypatch, 'tensorboard')
    assert tm.main(['--tensorboard', '--out-dir', str(tmp_path / 'run')]) == 2
    assert capsys.readouterr().err == ('usage error: --tensorboard needs the tensorboard package: '
                                       'pip install tensorboard\n')
    assert not (tmp_path / 'run').exists()


def test_tensorboard_added_on_resuming_a_finished_run_has_the_projector_too(tmp_path, data_dir):
    run = tmp_path / 'run'
    assert tm.main([*FAST, '--data-dir', str(data_dir), '--out-dir', str(run)]) == 0
    assert tm.main(['--resume', str(run), '--tensorboard']) == 0
    assert (run / 'projector_config.pbtxt').exists()
    assert np.loadtxt(run / '00012' / 'features' / 'tensors.tsv', delimiter='\t').shape == (200, 1568)


def test_tensorboard_end_written_again_after_a_stop_says_nothing_of_its_own(tmp_path, data_dir, capsys):
    """Stopped after TensorBoard's end was written but before summary.json, the run writes its end again on resume:
    add_embedding would print a warning of its own over the folder it finds."""
    run = tmp_path / 'run'
    assert tm.main([*FAST, '--tensorboard', '--data-dir', str(data_dir), '--out-dir', str(run)]) == 0
    (run / 'summary.json').unlink()
    (run / '00012' / 'features' / 'tensors.tsv').write_text('1\t2\n')  # (as a stop while it was written leaves it)
    capsys.readouterr()
    assert tm.main(['--resume', str(run)]) == 0
    assert 'warning' not in capsys.readouterr().out.lower()
    assert np.loadtxt(run / '00012' / 'features' / 'tensors.tsv', delimiter='\t').shape == (200, 1568)


def test_a_full_disk_under_tensorboards_writer_thread_is_one_line(tmp_path, data_dir, fixture_checksums):
    """Its thread re-raises a write that failed, which Python prints as a traceback; the run meets the same error
    at its next event and says it in one line."""
    (tmp_path / 'full_disk.py').write_text(
        'import errno\nfrom tensorboard.summary.writer import event_file_writer\nfrom train_mnist_cnn import main\n\n\n'
        'def no_space(self):\n    raise OSError(errno.ENOSPC, "No space left on device")\n\n\n'
        'event_file_writer._AsyncWriterThread._run = no_space\n')
    process = run_script([*FAST, '--tensorboard', '--data-dir', data_dir, '--out-dir', tmp_path / 'run'],
                         fixture_checksums, script=str(tmp_path / 'full_disk.py'), cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 1
    assert err.startswith('error: [Errno 28] No space left on device') and err.count('\n') == 1, err


@pytest.mark.parametrize('failing', ['the writer thread', 'the writer'])
def test_the_thread_hook_set_for_tensorboard_is_given_back_whatever_fails(tmp_path, data_dir, monkeypatch, failing):
    """Left in place, it would hide every later thread's OSError in this process (a notebook, a test run)."""
    from tensorboard.summary.writer import event_file_writer
    import threading

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, 'No space left on device')
    if failing == 'the writer thread':
        monkeypatch.setattr(event_file_writer._AsyncWriterThread, '_run', no_space)
    else:
        monkeypatch.setattr(event_file_writer.EventFileWriter, '__init__', no_space)
    before = threading.excepthook
    assert tm.main([*FAST, '--tensorboard', '--data-dir', str(data_dir), '--out-dir', str(tmp_path / 'run')]) == 1
    assert threading.excepthook is before


def test_a_tensorboard_that_cannot_be_used_is_one_line_before_any_work(tmp_path):
    """Installed but too old for torch.utils.tensorboard (it asks for 1.15 or above)."""
    shim = tmp_path / 'shim' / 'tensorboard'
    shim.mkdir(parents=True)
    (shim / '__init__.py').write_text("__version__ = '1.14.0'\n")
    done = subprocess.run([sys.executable, SCRIPT, '--tensorboard', '--out-dir', str(tmp_path / 'run')],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, 'PYTHONPATH': str(tmp_path / 'shim')})
    assert done.returncode == 2 and done.stdout == ''
    assert done.stderr.startswith('usage error: --tensorboard: the tensorboard package here cannot be used (')
    assert done.stderr.endswith('): pip install --upgrade tensorboard\n') and done.stderr.count('\n') == 1
    assert not (tmp_path / 'run').exists()


def test_a_tensorboard_whose_hparams_plugin_fails_to_import_is_one_line_before_any_work(monkeypatch):
    """tensorboard before 2.17.1 imports under NumPy 2, but its hparams plugin, which the run's end needs, does not
    (np.string_): found after training, it ended the run in a traceback with its outputs unwritten."""
    monkeypatch.setitem(sys.modules, 'tensorboard.plugins.hparams.metadata', None)  # (its import now fails)
    with pytest.raises(tm.UsageError, match=r'^--tensorboard: the tensorboard package here cannot be used \(.*'
                                            r'hparams.*\): pip install --upgrade tensorboard$'):
        tm.check_tensorboard('run', from_checkpoint=False)


def test_a_resume_whose_tensorboard_cannot_be_used_is_told_of_no_tensorboard(monkeypatch):
    def too_old(name):
        raise ImportError('TensorBoard logging requires TensorBoard version 1.15 or above')
    monkeypatch.setattr(tm.importlib, 'import_module', too_old)
    with pytest.raises(tm.UsageError, match=r'\(TensorBoard logging .*\): pip install --upgrade tensorboard, or '
                                            r'resume with --no-tensorboard$'):
        tm.check_tensorboard('run', from_checkpoint=True)


def test_tensorboard_into_a_folder_whose_name_is_no_text_is_one_line(tmp_path, capsys):
    """A POSIX file name may hold bytes that are no UTF-8; TensorBoard's writer cannot take them."""
    run = str(tmp_path) + '/run\udcff'
    assert tm.main(['--tensorboard', '--out-dir', run]) == 2
    assert capsys.readouterr().err == (f'usage error: --tensorboard: TensorBoard writes only into folders whose names '
                                       f'are text, not {tmp_path}/run\\xff\n')
    assert not os.path.exists(run)


def test_a_loss_below_the_metrics_six_decimals_keeps_its_first_digits(tmp_path, data_dir, monkeypatch):
    """Batches of one image learn to losses below 5e-7: rounded to 0.0, they left the log-scaled plots, and the
    film's loss axis was set to 0 with matplotlib's warning."""
    step = tm.train_step
    monkeypatch.setattr(tm, 'train_step', lambda *args, **kwargs: step(*args, **kwargs) * 1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # the script's warnings and matplotlib's, not matplotlib's use of pyparsing's
        warnings.filterwarnings('ignore', category=DeprecationWarning, module=r'(matplotlib|pyparsing)\.')  # old names
        assert tm.main(['--device', 'cpu', '--log-interval', '4', '--tsne-points', '50', '--eval-size', '50',
                        '--data-dir', str(data_dir), '--out-dir', str(tmp_path / 'run')]) == 0
    with open(tmp_path / 'run' / 'metrics.csv') as f:
        losses = [float(row['train_loss']) for row in csv.DictReader(f)]
    assert len(losses) == 3 and all(0 < loss < 1e-8 for loss in losses)
