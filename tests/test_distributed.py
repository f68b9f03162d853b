"""torchrun: the same script, data-parallel with Gloo on CPU, on the fixture."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

import train_mnist_cnn as tm
from conftest import FAST, ROOT

LAUNCHER = '''import os, sys
sys.path.insert(0, {root!r})
import train_mnist_cnn as tm
tm.MNIST_MD5.update({checksums!r})
if os.environ.get('FAIL_RANK') == os.environ['RANK']:  # a rank that fails mid-run, or is killed
    import signal
    real_step, steps = tm.train_step, []
    def train_step(*args):
        steps.append(1)
        if len(steps) == 3 and os.environ.get('FAIL_HOW') == 'SIGKILL':
            os.kill(os.getpid(), signal.SIGKILL)
        if len(steps) == 3:
            raise RuntimeError('injected failure in rank ' + os.environ['RANK'])
        return real_step(*args)
    tm.train_step = train_step
if os.environ.get('SLOW_OUTPUTS') and os.environ['RANK'] == '0':  # the others reach the end long before it
    import time
    real_write_outputs = tm.Run.write_outputs
    tm.Run.write_outputs = lambda *args: time.sleep(float(os.environ['SLOW_OUTPUTS'])) or real_write_outputs(*args)
if os.environ.get('STOP_AT_END'):  # a stop signal that this rank alone sees while the last epoch is scored
    import signal
    real_test_all, real_stop = tm.Run.test_all, tm.Run.stop
    if os.environ['STOP_AT_END'] == os.environ['RANK']:
        tm.Run.test_all = lambda self: signal.raise_signal(signal.SIGTERM) or real_test_all(self)
    tm.Run.stop = lambda self, signals: open('stopped-' + os.environ['RANK'], 'w').close() or real_stop(self, signals)
sys.exit(tm.main(sys.argv[1:]))
'''


def torchrun_command(tmp_path, checksums, args, processes=2, launch=('--standalone',)):
    launcher = tmp_path / 'launch.py'
    launcher.write_text(LAUNCHER.format(root=ROOT, checksums=checksums))
    return [sys.executable, '-m', 'torch.distributed.run', *launch, f'--nproc_per_node={processes}',
            str(launcher), *map(str, args)]


def torchrun(tmp_path, checksums, args, processes=2, env_changes=None, timeout=240, launch=('--standalone',)):
    env = {**os.environ, 'MPLBACKEND': 'Agg', 'OMP_NUM_THREADS': '1', **(env_changes or {})}
    return subprocess.run(torchrun_command(tmp_path, checksums, args, processes, launch), capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=tmp_path)


def ended_well(returncode, stderr):
    """Exit 0; or torchrun's 1 where torch's own teardown aborted a process after all was done, as now and then it
    does (the README says so): its line, a SIGABRT as the only cause, and no error of the script's."""
    return returncode == 0 or (returncode == 1 and 'terminate called without an active exception' in stderr
                               and 'exitcode  : -6' in stderr and 'error: ' not in stderr)


def test_two_processes_match_one_over_the_same_global_batches(tmp_path, data_dir, fixture_checksums):
    flags = [*FAST, '--epochs', '2', '--batch-size', '50', '--data-dir', data_dir]
    out = torchrun(tmp_path, fixture_checksums, [*flags, '--out-dir', tmp_path / 'ddp'])
    assert ended_well(out.returncode, out.stderr), out.stderr[-3000:]
    assert out.stdout.count('done: test accuracy') == 1  # only rank 0 reports
    assert 'device: cpu (2 processes)' in out.stdout
    assert sorted(os.listdir(tmp_path / 'ddp')) == ['confusion.png', 'curves.png', 'metrics.csv', 'model.pt',
                                                    'samples.png', 'summary.json']
    assert json.loads((tmp_path / 'ddp' / 'summary.json').read_text())['world_size'] == 2

    assert tm.main([*map(str, flags), '--out-dir', str(tmp_path / 'single')]) == 0
    ddp = torch.load(tmp_path / 'ddp' / 'model.pt', weights_only=True)
    single = torch.load(tmp_path / 'single' / 'model.pt', weights_only=True)
    assert ddp['step'] == single['step'] == 24
    for key, value in single['model'].items():
        torch.testing.assert_close(ddp['model'][key], value, rtol=1e-3, atol=1e-4)
    losses = [[row['train_loss'] for row in run['progress']['metrics']] for run in (ddp, single)]
    torch.testing.assert_close(*map(torch.tensor, losses), rtol=1e-3, atol=1e-4)  # the global batch's, not rank 0's


def test_the_others_wait_for_the_first_process_outputs_and_the_checkpoint_resumes_in_one_process(
        tmp_path, data_dir, fixture_checksums):
    # rank 0's outputs slowed down: the others reach the end long before it, and must not abort the job
    out = torchrun(tmp_path, fixture_checksums, [*FAST, '--data-dir', data_dir, '--out-dir', tmp_path / 'run'],
                   env_changes={'SLOW_OUTPUTS': '3'})
    assert ended_well(out.returncode, out.stderr), out.stderr[-3000:]
    assert (tmp_path / 'run' / 'summary.json').exists()
    assert tm.main(['--resume', str(tmp_path / 'run'), '--epochs', '2']) == 0
    summary = json.loads((tmp_path / 'run' / 'summary.json').read_text())
    assert summary['epochs'] == 2 and summary['steps'] == 24 and summary['world_size'] == 1


def test_a_failing_rank_ends_the_whole_job(tmp_path, data_dir, fixture_checksums):
    out = torchrun(tmp_path, fixture_checksums, [*FAST, '--data-dir', data_dir, '--out-dir', tmp_path / 'run'],
                   env_changes={'FAIL_RANK': '1'}, timeout=180)
    assert out.returncode != 0
    assert 'injected failure in rank 1' in out.stderr
    assert not (tmp_path / 'run' / 'summary.json').exists()


def test_a_stop_after_the_last_step_stops_every_process(tmp_path, data_dir, fixture_checksums):
    """Rank 0 alone sees the signal, while it scores the last epoch: the others stop with it, not as failed."""
    logs = tmp_path / 'logs'
    out = torchrun(tmp_path, fixture_checksums, [*FAST, '--data-dir', data_dir, '--out-dir', tmp_path / 'run'],
                   env_changes={'STOP_AT_END': '0'},
                   launch=('--standalone', '--redirects', '3', '--log-dir', str(logs)))
    assert out.returncode != 0  # (torchrun's own, for a process that stopped on a signal)
    [rank0], [rank1] = logs.glob('*/attempt_0/0/stdout.log'), logs.glob('*/attempt_0/1/stderr.log')
    assert 'interrupted at step 12; checkpoint saved. Resume with:' in rank0.read_text()
    assert (tmp_path / 'stopped-1').exists()  # rank 1 stopped too, rather than going on to the end
    assert 'failed' not in rank1.read_text()  # (torch's teardown may still abort it, rarely: see the README)
    assert torch.load(tmp_path / 'run' / 'model.pt', weights_only=True)['step'] == 12


def test_batch_smaller_than_the_processes_is_a_usage_error(tmp_path, data_dir, fixture_checksums):
    out = torchrun(tmp_path, fixture_checksums, [*FAST, '--batch-size', '1', '--data-dir', data_dir])
    assert out.returncode != 0
    assert 'usage error: --batch-size 1 is smaller than the 2 processes' in out.stderr


@pytest.mark.parametrize('env, expected', [
    ({}, tm.World()),
    ({'RANK': '1', 'WORLD_SIZE': '2', 'LOCAL_RANK': '1'}, tm.World(1, 2, 1)),
    ({'WORLD_SIZE': '1'}, tm.World()),  # a launcher's leftover: a plain run
    ({'WORLD_SIZE': '2', 'RANK': '1'}, tm.World(1, 2, 0)),  # Kubeflow: one process a pod, no LOCAL_RANK
])
def test_processes_come_from_torchruns_variables(monkeypatch, env, expected):
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert tm.world_from_env() == expected


def test_only_the_first_process_says_where_a_stop_left_the_run(capsys):
    """Only the first process knows the folder of a run it named (runs/<stamp>): the others would print a resume
    command with no folder in it. At the start each says that nothing was written, which holds for all."""
    unnamed = tm.Status(out_dir='')  # as the others hold it
    assert tm.exit_code(tm.Stopped(signal.SIGINT, tm.Stage.OUTPUTS), unnamed, tm.World(1, 2, 1)) == 130
    assert capsys.readouterr().err == ''
    assert tm.exit_code(tm.Stopped(signal.SIGTERM, tm.Stage.STARTING), unnamed, tm.World(1, 2, 1)) == 143
    assert capsys.readouterr().err == '[rank 1] interrupted before training started; nothing was written\n'
    assert tm.exit_code(tm.Stopped(signal.SIGINT, tm.Stage.OUTPUTS), tm.Status(out_dir='runs/x'), tm.World(0, 2)) == 130
    assert "training is done and saved in runs/x. Write them with: " in capsys.readouterr().err


def test_survivors_of_a_killed_process_say_so_in_one_line_and_keep_the_steps_trained(tmp_path, data_dir,
                                                                                      fixture_checksums):
    logs = tmp_path / 'logs'
    out = torchrun(tmp_path, fixture_checksums, [*FAST, '--data-dir', data_dir, '--out-dir', tmp_path / 'run'],
                   env_changes={'FAIL_RANK': '1', 'FAIL_HOW': 'SIGKILL'}, timeout=180,
                   launch=('--standalone', '--redirects', '3', '--log-dir', str(logs)))
    assert out.returncode != 0
    [survivor], [said] = logs.glob('*/attempt_0/0/stderr.log'), logs.glob('*/attempt_0/0/stdout.log')
    assert survivor.read_text() == '[rank 0] error: another process of the job failed; its own output says why\n'
    assert 'checkpoint saved at step 2; resume with: torchrun --nproc_per_node=2 ' in said.read_text()
    checkpoint = torch.load(tmp_path / 'run' / 'model.pt', weights_only=True)
    assert checkpoint['step'] == 2 and checkpoint['optimizer']['state'][0]['step'].item() == 2
    assert tm.main(['--resume', str(tmp_path / 'run')]) == 0  # (in one process)


def free_port_below_the_ephemeral_range():
    """A port no outgoing connection takes as its own: a node that connects to one in the ephemeral range before the
    other node listens there can be handed that very port as its source, and so connect to itself, and wait."""
    for port in range(20000 + os.getpid() % 10000, 32768):
        with socket.socket() as s:
            try:
                s.bind(('127.0.0.1', port))
            except OSError:
                continue
            return port
    raise RuntimeError('no free port below 32768')


def test_the_first_process_of_every_machine_makes_sure_of_the_data(tmp_path, data_dir, fixture_source,
                                                                    fixture_checksums):
    """Two machines simulated on this one: the second has its own data folder, holding only the .gz files."""
    other = tmp_path / 'other-machine' / 'MNIST' / 'raw'
    other.mkdir(parents=True)
    for name in fixture_checksums:
        (other / (name + '.gz')).write_bytes((fixture_source[0] / (name + '.gz')).read_bytes())
    port = free_port_below_the_ephemeral_range()
    env = {**os.environ, 'MPLBACKEND': 'Agg', 'OMP_NUM_THREADS': '1'}
    nodes = []
    for node, data in enumerate([data_dir, other.parent.parent]):
        (tmp_path / f'node{node}').mkdir()
        launch = ('--nnodes=2', f'--node_rank={node}', '--master_addr=127.0.0.1', f'--master_port={port}')
        command = torchrun_command(tmp_path / f'node{node}', fixture_checksums,
                                   [*FAST, '--data-dir', data, '--out-dir', tmp_path / 'run'], 1, launch)
        nodes.append(subprocess.Popen(command, env=env, cwd=tmp_path / f'node{node}', stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = [None, nodes[1].communicate(timeout=240)]
    aborted = 'terminate called without an active exception' in outputs[1][1]  # (see ended_well)
    codes = [None, nodes[1].returncode]
    try:
        outputs[0] = nodes[0].communicate(timeout=60 if aborted else 240)
        codes[0] = nodes[0].returncode
    except subprocess.TimeoutExpired:  # torchrun on node 0 waits 5 minutes at its exit barrier for node 1's, which
        nodes[0].kill()                 # the abort ended: the run itself is done, as it says
        outputs[0] = nodes[0].communicate()
        assert aborted and 'done: test accuracy' in outputs[0][0], outputs[0][0][-3000:]
        codes[0] = 0
    assert all(ended_well(code, err) for code, (_, err) in zip(codes, outputs)), outputs[1][1][-3000:]
    assert '[rank 1] data: local files verified (md5)' in outputs[1][0]
    assert sorted(p.name for p in other.iterdir() if not p.name.endswith('.gz')) == sorted(fixture_checksums)
    assert json.loads((tmp_path / 'run' / 'summary.json').read_text())['world_size'] == 2
