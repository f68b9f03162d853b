"""Your own handwriting: predict_digits.py on digit images prepared the way MNIST's were; offline, on fixtures."""
import csv
import hashlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import warnings
import zipfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

import predict_digits as pd
import train_mnist_cnn as tm
from conftest import (PREDICT_SCRIPT, ROOT, drawn_on_a_transparent_canvas, inline_metadata, photo_like, run_script,
                      write_idx)

TRAIN = ['--device', 'cpu', '--epochs', '3', '--batch-size', '20', '--log-interval', '10', '--eval-size', '200',
         '--tsne-points', '100']


def glyph_digits(count, rng):
    """Digits told apart by their shape, as MNIST's are: a font's glyphs at random sizes, slants and places,
    then prepared as MNIST's digits were, so the photos of them below must come back to the same 28x28."""
    images, labels = [], np.arange(count) % 10
    for label in labels:
        sheet = Image.new('L', (64, 64))
        font = ImageFont.load_default(size=int(rng.integers(26, 40)))
        ImageDraw.Draw(sheet).text((int(rng.integers(4, 24)), int(rng.integers(0, 16))), str(label), fill=255,
                                   font=font)
        images.append(pd.mnist_like(sheet.rotate(float(rng.uniform(-15, 15)), resample=Image.Resampling.BILINEAR)))
    return np.stack(images), labels.astype(np.uint8)


@pytest.fixture(scope='module')
def glyphs(tmp_path_factory):
    """A fixture MNIST of glyph digits, a model trained on it with the film on, and the data's md5s."""
    base = tmp_path_factory.mktemp('glyphs')
    raw = base / 'data' / 'MNIST' / 'raw'
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_images, train_labels = glyph_digits(600, rng)
    test_images, test_labels = glyph_digits(200, rng)
    arrays = {'train-images-idx3-ubyte': train_images, 'train-labels-idx1-ubyte': train_labels,
              't10k-images-idx3-ubyte': test_images, 't10k-labels-idx1-ubyte': test_labels}
    for name, array in arrays.items():
        write_idx(raw / name, array)
    checksums = {name: hashlib.md5((raw / name).read_bytes()).hexdigest() for name in arrays}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tm, 'MNIST_MD5', checksums)
        assert tm.main([*TRAIN, '--data-dir', str(base / 'data'), '--out-dir', str(base / 'run')]) == 0
    model = tm.CNN()
    model.load_state_dict(torch.load(base / 'run' / 'model.pt', weights_only=True)['model'])
    with torch.inference_mode():
        predicted = model(torch.from_numpy(test_images).unsqueeze(1).float() / 255)[0].argmax(1).numpy()
    return {'data': base / 'data', 'run': base / 'run', 'md5': checksums, 'test_images': test_images,
            'test_labels': test_labels, 'predicted': predicted}


@pytest.fixture
def glyph_md5(glyphs, monkeypatch):
    monkeypatch.setattr(tm, 'MNIST_MD5', glyphs['md5'])


def predict(args, capsys):
    code = pd.main([*map(str, args)])
    captured = capsys.readouterr()
    assert 'Traceback' not in captured.out + captured.err
    return code, captured.out, captured.err


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_the_glyph_model_learned_its_digits(glyphs):
    assert (glyphs['predicted'] == glyphs['test_labels']).mean() > 0.9


def test_photos_of_test_digits_are_read_as_their_tensors_are(glyphs, glyph_md5, tmp_path, capsys):
    photos = tmp_path / 'photos'
    photos.mkdir()
    digits = glyphs['test_images'][:12]
    for i, digit in enumerate(digits[:9]):
        photo_like(digit, offset=(5 + 3 * i, 20 - 2 * i)).save(photos / f'{i:02}.png')
    photo_like(digits[9]).save(photos / '09.jpg', quality=92)
    drawn_on_a_transparent_canvas(digits[10]).save(photos / '10.png')
    photo_like(digits[11], paper=30, ink=230).save(photos / '11.png')  # light chalk on a dark board
    code, out, err = predict([photos, '--model', glyphs['run'], '--data-dir', glyphs['data'], '--out-dir',
                              tmp_path / 'out'], capsys)
    assert code == 0 and err == ''
    rows = read_csv(tmp_path / 'out' / 'predictions.csv')
    assert [os.path.basename(r['file']) for r in rows] == sorted(os.listdir(photos))
    assert [int(r['predicted']) for r in rows] == glyphs['predicted'][:12].tolist()
    for row in rows:
        probabilities = [float(row[f'p{d}']) for d in range(10)]
        assert abs(sum(probabilities) - 1) < 1e-4 and int(row['predicted']) == int(np.argmax(probabilities))
        top = np.argsort(probabilities)[::-1][:3]
        assert f'{row["file"]}: ' + ' | '.join(f'{d} ({probabilities[d]:.1%})' for d in top) in out
    assert 'note: no t-SNE panel' not in out
    with Image.open(tmp_path / 'out' / 'predictions.png') as picture:
        assert picture.width > 1000


@pytest.mark.parametrize('shape', ['glyph', 'tall', 'wide', 'off-centre blob'])
def test_preparation_centres_the_mass_and_scales_the_longer_side_to_20(glyphs, shape):
    sheet = np.full((90, 120), 210, dtype=np.uint8)  # light grey paper
    if shape == 'glyph':
        sheet = np.asarray(photo_like(glyphs['test_images'][3], size=(120, 90), offset=(20, 2)).convert('L')).copy()
    elif shape == 'tall':
        sheet[10:80, 30:38] = 30
    elif shape == 'wide':
        sheet[40:52, 10:100] = 30
    else:
        sheet[5:35, 80:110] = 30
        sheet[5:12, 80:90] = 0  # heavier in one corner: the mass is off the box's centre
    seen = pd.mnist_like(Image.fromarray(sheet))
    weights = seen.astype(np.float64)
    rows, cols = np.indices(seen.shape)  # pixel (14, 14) is where MNIST's centres of mass lie
    centre = ((rows * weights).sum() / weights.sum(), (cols * weights).sum() / weights.sum())
    assert abs(centre[0] - 14) <= 0.5 and abs(centre[1] - 14) <= 0.5
    ink_rows, ink_cols = np.nonzero(seen >= 0.3 * seen.max())
    assert max(np.ptp(ink_rows), np.ptp(ink_cols)) + 1 == 20
    assert seen.dtype == np.uint8 and seen.max() > 200 and seen[0].max() == seen[-1].max() == 0


def test_polarity_is_found_for_both_paper_colours(glyphs):
    digit = glyphs['test_images'][5]
    photo = photo_like(digit, paper=215, ink=25)
    on_paper = pd.mnist_like(photo)
    on_a_board = pd.mnist_like(Image.fromarray(255 - np.asarray(photo)))  # the same, light chalk on a dark board
    assert np.array_equal(on_paper, on_a_board)
    assert on_paper[0, 0] == 0 and on_paper.max() > 200
    assert np.corrcoef(on_paper.ravel(), digit.ravel())[0, 1] > 0.9  # and it is the digit that was photographed


def decompression_bomb(path):
    """A PNG whose header claims 40000 x 40000 pixels: Pillow refuses it before decoding anything."""
    png = bytearray(_small_png())
    png[16:24] = struct.pack('>II', 40000, 40000)  # IHDR's width and height
    png[29:33] = struct.pack('>I', zlib.crc32(bytes(png[12:29])))
    path.write_bytes(bytes(png))


def _small_png():
    import io
    buffer = io.BytesIO()
    Image.new('L', (8, 8), 128).save(buffer, format='PNG')
    return buffer.getvalue()


def test_bad_inputs_are_a_line_each_and_never_stop_the_others(glyphs, glyph_md5, tmp_path, capsys):
    folder = tmp_path / 'mixed'
    folder.mkdir()
    photo_like(glyphs['test_images'][0]).save(folder / 'a-good.png')
    Image.new('RGB', (60, 60), (230, 230, 230)).save(folder / 'b-blank.png')
    (folder / 'c-not-an-image.png').write_text('these are words, not pixels')
    decompression_bomb(folder / 'd-bomb.png')
    (folder / 'e-truncated.png').write_bytes((folder / 'a-good.png').read_bytes()[:200])
    photo_like(glyphs['test_images'][1]).save(folder / 'f-good.png')
    (tmp_path / 'empty').mkdir()
    code, out, err = predict([folder, tmp_path / 'missing.png', tmp_path / 'empty', '--model', glyphs['run'],
                              '--out-dir', tmp_path / 'out'], capsys)
    assert code == 1
    lines = err.splitlines()
    assert lines[0] == f'{folder}/b-blank.png: no ink: the image is blank'
    assert lines[1] == f'{folder}/c-not-an-image.png: not an image Pillow can open'
    assert lines[2].startswith(f'{folder}/d-bomb.png: refused as a decompression bomb (Image size (1600000000 pixels)')
    assert lines[3].startswith(f'{folder}/e-truncated.png: cannot be read (')
    assert lines[4:] == [f'{tmp_path}/missing.png: no such file',
                         f'{tmp_path}/empty: a folder with no image Pillow opens']
    assert [os.path.basename(r['file']) for r in read_csv(tmp_path / 'out' / 'predictions.csv')] == \
        ['a-good.png', 'f-good.png']
    assert 'done: 2 images predicted' in out and '6 could not be read' in out


def test_a_folder_of_many_is_streamed_and_the_picture_shows_the_least_confident(glyphs, glyph_md5, tmp_path,
                                                                               monkeypatch, capsys):
    folder = tmp_path / 'many'
    folder.mkdir()
    for i, digit in enumerate(glyphs['test_images'][:30]):
        photo_like(digit).save(folder / f'{i:03}.png')
    monkeypatch.setattr(pd, 'PREDICT_BATCH', 4)
    monkeypatch.setattr(pd, 'PICTURE_MOST', 5)
    pulled, real_images_to_read = [], pd.images_to_read

    def counting(paths):
        for entry in real_images_to_read(paths):
            pulled.append(entry)
            yield entry
    monkeypatch.setattr(pd, 'images_to_read', counting)
    real_read, pulled_before_first_prediction = pd.mnist_like, []
    monkeypatch.setattr(pd, 'mnist_like', lambda image: pulled_before_first_prediction.append(len(pulled))
                        or real_read(image))
    drawn = {}
    real_draw = pd.draw_predictions
    monkeypatch.setattr(pd, 'draw_predictions', lambda shown, total, film: drawn.update(shown=shown, total=total)
                        or real_draw(shown, total, film))
    code, out, _ = predict([folder, '--model', glyphs['run'], '--out-dir', tmp_path / 'out'], capsys)
    assert code == 0 and max(pulled_before_first_prediction[:4]) <= 4  # a batch at a time, not the whole folder
    rows = read_csv(tmp_path / 'out' / 'predictions.csv')
    assert len(rows) == 30 and drawn['total'] == 30 and len(drawn['shown']) == 5
    confidence = sorted((max(float(r[f'p{d}']) for d in range(10)), r['file']) for r in rows)
    assert [entry[2] for entry in drawn['shown']] == [file for _, file in confidence[:5]]


def test_the_t_sne_panel_needs_the_runs_film_and_the_data(glyphs, glyph_md5, tmp_path, capsys):
    photo_like(glyphs['test_images'][0]).save(tmp_path / 'one.png')
    film = pd.film_for_predictions(str(glyphs['run']), str(glyphs['data']), model_of(glyphs), torch.device('cpu'),
                                   print)
    assert film['embedding'].shape == (100, 2) and film['features'].shape == (100, 1568)
    test_only = tmp_path / 'test-only'
    (test_only / 'MNIST' / 'raw').mkdir(parents=True)
    for name in ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'):  # the panel needs the test images alone
        shutil.copy(glyphs['data'] / 'MNIST' / 'raw' / name, test_only / 'MNIST' / 'raw' / name)
    assert pd.film_for_predictions(str(glyphs['run']), str(test_only), model_of(glyphs), torch.device('cpu'),
                                   print)['embedding'].shape == (100, 2)
    _, out, _ = predict([tmp_path / 'one.png', '--model', glyphs['run'], '--data-dir', tmp_path / 'nodata',
                         '--out-dir', tmp_path / 'out1'], capsys)
    assert f'note: no t-SNE panel: the test images it shows are not in --data-dir {tmp_path / "nodata"}' in out
    bare = tmp_path / 'bare-run'
    bare.mkdir()
    shutil.copy(glyphs['run'] / 'model.pt', bare / 'model.pt')
    _, out, _ = predict([tmp_path / 'one.png', '--model', bare, '--data-dir', glyphs['data'], '--out-dir',
                         tmp_path / 'out2'], capsys)
    assert f'note: no t-SNE panel: {bare} has no tsne.npz' in out
    assert f'model: {bare / "model.pt"} (test accuracy unknown: no summary.json of these weights beside them)' in out
    assert (tmp_path / 'out2' / 'predictions.png').exists()


def model_of(glyphs):
    model = tm.CNN()
    model.load_state_dict(torch.load(glyphs['run'] / 'model.pt', weights_only=True)['model'])
    return model.eval()


def test_an_image_of_a_shown_test_digit_lands_among_its_neighbours(glyphs, glyph_md5):
    film = pd.film_for_predictions(str(glyphs['run']), str(glyphs['data']), model_of(glyphs), torch.device('cpu'),
                                   print)
    figure = pd.draw_predictions([(0.5, 0, 'x.png', glyphs['test_images'][7], np.full(10, 0.1),
                                   film['features'][7])], 1, film)
    stars = [c for ax in figure.axes for c in ax.collections if c.get_offsets().shape == (1, 2)]
    position = stars[0].get_offsets()[0]
    distances = np.linalg.norm(film['embedding'] - film['embedding'][7], axis=1)
    assert np.linalg.norm(position - film['embedding'][7]) <= np.sort(distances)[film['neighbours']]


def test_the_newest_run_is_the_default_model_and_the_line_says_which(glyphs, glyph_md5, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name, when in (('older', 1_000_000_000), ('newer', 1_500_000_000)):
        shutil.copytree(glyphs['run'], tmp_path / 'runs' / name)
        os.utime(tmp_path / 'runs' / name / 'model.pt', (when, when))
    photo_like(glyphs['test_images'][0]).save(tmp_path / 'one.png')
    code, out, _ = predict([tmp_path / 'one.png'], capsys)
    accuracy = json.loads((glyphs['run'] / 'summary.json').read_text())['test_accuracy']
    assert code == 0 and out.splitlines()[0] == f'model: runs/newer/model.pt (test accuracy {accuracy:.4f})'
    assert out.splitlines()[2].startswith('done: 1 image predicted in ')
    assert len([p for p in (tmp_path / 'runs').iterdir()]) == 3  # the two runs and this prediction's folder


def test_no_model_anywhere_says_how_to_train_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'one.png').write_bytes(_small_png())
    code, _, err = predict([tmp_path / 'one.png'], capsys)
    assert code == 1
    assert err == ('error: no trained model found (runs/*/model.pt): train one with `python train_mnist_cnn.py`, '
                   'or name one with --model\n')
    assert not (tmp_path / 'runs').exists()


def test_a_run_folder_whose_model_pt_is_a_folder_is_named_as_given(tmp_path, monkeypatch, capsys):
    (tmp_path / 'run' / 'model.pt').mkdir(parents=True)
    (tmp_path / 'one.png').write_bytes(_small_png())
    code, _, err = predict([tmp_path / 'one.png', '--model', tmp_path / 'run'], capsys)
    assert (code, err) == (1, f'error: --model {tmp_path / "run"}: no checkpoint at {tmp_path / "run" / "model.pt"}\n')

@pytest.mark.parametrize('main, flags, message', [
    (pd.main, ['x.png', '--epochs', '2'], 'unrecognized arguments: --epochs 2'),
    (pd.main, ['x.png', '--no-tsne'], 'unrecognized arguments: --no-tsne'),
    (pd.main, ['x.png', '--device', 'gpu'], "argument --device: expected auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
    (pd.main, ['x.png', '--threads', '0'], 'argument --threads: must be between 1 and 1024'),
    (pd.main, [], 'the following arguments are required: IMAGE_OR_FOLDER'),
    (tm.main, ['--predict', 'x.png'], 'reading digit images has its own script: python predict_digits.py'),
    (tm.main, ['--model', 'runs/a'], 'reading digit images has its own script: python predict_digits.py'),
])
def test_a_flag_of_the_other_script_is_a_usage_error(main, flags, message, tmp_path, capsys):
    assert main([*flags, '--out-dir', str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err
    assert err.startswith('usage error:') and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('mode', ['-P', '-I'])
def test_the_trainer_beside_it_is_found_where_python_leaves_the_scripts_folder_out(tmp_path, mode):
    """python -P (PYTHONSAFEPATH) and -I put no script folder on sys.path; the trainer is imported all the same."""
    done = subprocess.run([sys.executable, mode, PREDICT_SCRIPT, '--help'], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert (done.returncode, done.stderr) == (0, '') and done.stdout.startswith('usage: predict_digits.py')


def test_help_says_what_it_reads_and_takes_the_trainers_device_flags(capsys):
    assert pd.main(['--help']) == 0
    text = ' '.join(capsys.readouterr().out.split())
    for flag in ('IMAGE_OR_FOLDER', '--model PATH', '--out-dir DIR', '--device DEV', '--threads N', '--data-dir DIR'):
        assert flag in text
    assert "default: the newest runs/*/model.pt, not a dry run's)" in text and 'default: auto)' in text
    assert 'exit codes: 0 done, 1 an image could not be read' in text


def test_inline_script_metadata_needs_no_more_than_the_trainer():
    trainer, predictor = inline_metadata(tm.__file__), inline_metadata(pd.__file__)
    assert set(predictor['dependencies']) <= set(trainer['dependencies'])
    assert predictor['requires-python'] == trainer['requires-python']


# Found by trying to break it

def one_photo(glyphs, folder, name='one.png', index=0):
    folder.mkdir(parents=True, exist_ok=True)
    photo_like(glyphs['test_images'][index]).save(folder / name)
    return folder / name


def test_ctrl_c_after_the_table_is_written_says_so(glyphs, glyph_md5, tmp_path, monkeypatch, capsys):
    real = pd.film_for_predictions

    def ctrl_c_then_film(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)
    monkeypatch.setattr(pd, 'film_for_predictions', ctrl_c_then_film)
    code, _, err = predict([one_photo(glyphs, tmp_path / 'in'), '--model', glyphs['run'], '--out-dir',
                            tmp_path / 'out'], capsys)
    assert code == 130
    assert err == f'interrupted while drawing predictions.png; predictions.csv is written in {tmp_path / "out"}\n'
    assert len(read_csv(tmp_path / 'out' / 'predictions.csv')) == 1


def test_16_bit_and_float_scans_are_read_in_their_own_range(glyphs, glyph_md5, tmp_path, capsys):
    folder = tmp_path / 'scans'
    folder.mkdir()
    for i, kind in enumerate(('uint16', 'float32', 'float32 over all its range')):
        grey = np.asarray(photo_like(glyphs['test_images'][i]).convert('L'), dtype=np.float64) / 255
        if kind == 'uint16':  # paper near 40000, ink near 10000: all of it above 8 bits
            Image.fromarray((10000 + grey * 30000).astype(np.uint16)).save(folder / f'{i}.png')
        else:  # from 0 to 1, or from -3e38 to 3e38, whose difference float32 cannot hold
            Image.fromarray((grey if kind == 'float32' else grey * 6e38 - 3e38).astype(np.float32)).save(
                folder / f'{i}.tiff')
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always')
        code, _, err = predict([folder, '--model', glyphs['run'], '--out-dir', tmp_path / 'out'], capsys)
    assert code == 0 and err == '' and [str(w.message) for w in seen] == []
    assert [int(r['predicted']) for r in read_csv(tmp_path / 'out' / 'predictions.csv')] == \
        glyphs['predicted'][:3].tolist()


def test_a_thin_stroke_is_seen_at_full_ink_as_mnists_are():
    drawing = Image.new('L', (600, 600), 'white')  # a 7 drawn with a paint program's 3-pixel pencil
    ImageDraw.Draw(drawing).line([(150, 100), (450, 100), (260, 500)], fill='black', width=3, joint='curve')
    assert pd.mnist_like(drawing).max() == 255  # (shrunk to 20 pixels, it was a faint 62)
    one = Image.new('L', (600, 600), 'white')  # and a 1 as thin, its box under a pixel wide at 20 pixels high
    ImageDraw.Draw(one).line([(300, 100), (306, 500)], fill='black', width=3)
    assert pd.mnist_like(one).max() == 255


def test_a_float_scan_with_pixels_that_are_no_numbers_is_a_line_without_numpys_warnings(glyphs, glyph_md5, tmp_path,
                                                                                          capsys):
    grey = np.asarray(photo_like(glyphs['test_images'][0]).convert('L'), dtype=np.float32) / 255
    grey[0, 0] = np.nan
    Image.fromarray(grey).save(tmp_path / 'nan.tiff')
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always')
        code, _, err = predict([tmp_path / 'nan.tiff', '--model', glyphs['run'], '--out-dir', tmp_path / 'out'], capsys)
    assert code == 1 and [str(w.message) for w in seen] == []
    assert err == (f'{tmp_path / "nan.tiff"}: its pixels are not all finite numbers (NaN or infinity)\n'
                   'error: no image could be read: nothing was written\n')

@pytest.mark.parametrize('name, shown', [(b'x\xffy.png', 'x\\xffy.png'), (b'two\nlines.png', 'two\\nlines.png'),
                                         ('a\x85b\u2028c.png'.encode(), 'a\\x85b\\u2028c.png')])
def test_a_file_name_that_is_not_utf8_or_holds_a_newline_is_written_escaped(glyphs, glyph_md5, tmp_path, capsys,
                                                                            name, shown):
    """Still one line per image."""
    folder = tmp_path / 'names'
    folder.mkdir()
    photo_like(glyphs['test_images'][0]).save(os.path.join(os.fsencode(folder), name))
    code, out, _ = predict([folder, '--model', glyphs['run'], '--out-dir', tmp_path / 'out'], capsys)
    assert code == 0 and [line for line in out.splitlines() if line.startswith(f'{folder}/{shown}: ')]
    assert read_csv(tmp_path / 'out' / 'predictions.csv')[0]['file'] == f'{folder}/{shown}'


def film_of_a_billion_frames(path):
    """A header that asks for 800 GB of frames, and no frames."""
    embeddings, labels = io.BytesIO(), io.BytesIO()
    np.lib.format.write_array_header_1_0(embeddings, {'descr': '<f4', 'fortran_order': False,
                                                      'shape': (10**9, 100, 2)})
    np.save(labels, np.arange(100) % 10)
    with zipfile.ZipFile(path, 'w') as film:
        film.writestr('embeddings.npy', embeddings.getvalue())
        film.writestr('labels.npy', labels.getvalue())


@pytest.mark.parametrize('damage', [film_of_a_billion_frames, lambda p: p.write_bytes(os.urandom(300)),
                                    lambda p: np.savez(p, something_else=np.zeros(3)),
                                    lambda p: np.savez(p, embeddings=np.full((1, 100, 2), np.nan),
                                                       labels=np.zeros(100, dtype=np.int64)),
                                    lambda p: np.savez(p, embeddings=np.zeros((1, 5, 2)),
                                                       labels=np.zeros(5, dtype=np.int64))])
def test_a_damaged_film_beside_the_model_is_a_note(glyphs, glyph_md5, tmp_path, capsys, damage):
    run = tmp_path / 'run'
    shutil.copytree(glyphs['run'], run)
    damage(run / 'tsne.npz')
    code, out, _ = predict([one_photo(glyphs, tmp_path / 'in'), '--model', run, '--data-dir', glyphs['data'],
                            '--out-dir', tmp_path / 'out'], capsys)
    assert code == 0 and f'note: no t-SNE panel: {run}/tsne.npz cannot be read' in out
    assert (tmp_path / 'out' / 'predictions.png').exists()


@pytest.mark.parametrize('dtype', [np.float32, np.float64])
def test_a_film_of_points_far_out_is_a_note_without_warnings(glyphs, glyph_md5, tmp_path, capsys, dtype):
    run = tmp_path / 'run'
    shutil.copytree(glyphs['run'], run)
    far = np.random.default_rng(0).uniform(0.3, 1, size=(1, 100, 2)) * np.finfo(dtype).max
    np.savez(run / 'tsne.npz', embeddings=far.astype(dtype), labels=np.arange(100) % 10)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always')
        code, out, _ = predict([one_photo(glyphs, tmp_path / 'in'), '--model', run, '--data-dir', glyphs['data'],
                                '--out-dir', tmp_path / 'out'], capsys)
    assert code == 0 and [str(w.message) for w in seen] == []
    assert f'note: no t-SNE panel: {run}/tsne.npz cannot be read (its last frame holds points that are not' in out


def test_a_film_that_lacks_a_digit_draws_its_panel_without_warnings(tmp_path):
    """--tsne-points as low as 50 may leave a digit out of the film: its label is not drawn, and numpy says nothing."""
    rng = np.random.default_rng(0)
    film = {'embedding': rng.normal(size=(20, 2)).astype(np.float32), 'labels': np.arange(20) % 8,  # no 8, no 9
            'features': torch.rand(20, 1568), 'neighbours': 10}
    Image.new('L', (28, 28)).save(tmp_path / 'one.png')
    shown = [(0.5, 0, str(tmp_path / 'one.png'), np.zeros((28, 28), np.uint8), np.full(10, 0.1), torch.rand(1568))]
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        figure = pd.draw_predictions(shown, 1, film)
    labels = sorted(text.get_text() for text in figure.axes[-1].texts if not text.get_text().startswith('#'))
    assert labels == [str(digit) for digit in range(8)]


def test_the_title_over_a_single_image_is_not_cut_off(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    Image.new('L', (28, 28)).save(tmp_path / 'one.png')
    shown = [(0.5, 0, str(tmp_path / 'one.png'), np.zeros((28, 28), np.uint8), np.full(10, 0.1), torch.rand(1568))]
    figure = pd.draw_predictions(shown, 1, None)
    FigureCanvasAgg(figure).draw()
    title = figure.texts[0].get_window_extent()
    assert figure.texts[0].get_text().startswith('1 image predicted') and 0 <= title.x0 < title.x1 <= figure.bbox.x1


def test_a_damaged_summary_beside_the_model_is_not_read(glyphs, glyph_md5, tmp_path, capsys):
    run = tmp_path / 'run'
    shutil.copytree(glyphs['run'], run)
    (run / 'summary.json').write_text('[' * 100_000)  # deeper than Python's JSON reader goes
    code, out, _ = predict([one_photo(glyphs, tmp_path / 'in'), '--model', run, '--data-dir', glyphs['data'],
                            '--out-dir', tmp_path / 'out'], capsys)
    assert code == 0 and f'model: {run}/model.pt (test accuracy unknown: no summary.json of these weights ' in out


@pytest.mark.parametrize('beside', ['a bare state_dict', 'a later checkpoint', 'a step that is a tensor',
                                    'an accuracy that is no number'])
def test_the_accuracy_shown_is_of_the_runs_end_for_these_very_weights(glyphs, glyph_md5, tmp_path, capsys, beside):
    run = tmp_path / 'run'
    shutil.copytree(glyphs['run'], run)
    checkpoint = torch.load(run / 'model.pt', weights_only=True)
    summary = json.loads((run / 'summary.json').read_text())
    model = run / 'model.pt'
    if beside == 'a bare state_dict':  # weights of any run, copied into this one's folder
        model = run / 'weights.pt'
        torch.save(checkpoint['model'], model)
    elif beside == 'a later checkpoint':  # (the trainer removes the summary as it trains on; a copy may not)
        torch.save({**checkpoint, 'step': checkpoint['step'] + 1}, model)
    elif beside == 'a step that is a tensor':
        torch.save({**checkpoint, 'step': torch.tensor([summary['steps']] * 2)}, model)
    else:
        (run / 'summary.json').write_text(json.dumps({**summary, 'test_accuracy': float('nan')}))
    code, out, _ = predict([one_photo(glyphs, tmp_path / 'in'), '--model', model, '--data-dir', glyphs['data'],
                            '--out-dir', tmp_path / 'out'], capsys)
    assert code == 0 and out.startswith(f'model: {model} (test accuracy unknown: no summary.json of these weights ')


def test_a_pipe_is_not_read_and_nothing_hangs(glyphs, tmp_path, fixture_checksums):
    folder = tmp_path / 'in'
    one_photo(glyphs, folder)
    os.mkfifo(folder / 'b.png')
    out = run_script([folder, folder / 'b.png', '--model', glyphs['run'], '--out-dir', tmp_path / 'out'],
                     fixture_checksums, timeout=120, script=PREDICT_SCRIPT)
    assert out.returncode == 1 and out.stderr == f'{folder}/b.png: not a file (a pipe, a device?)\n'
    assert [os.path.basename(r['file']) for r in read_csv(tmp_path / 'out' / 'predictions.csv')] == ['one.png']


def test_an_output_folder_among_the_inputs_is_not_read_back(glyphs, glyph_md5, tmp_path, capsys):
    folder = tmp_path / 'in'
    one_photo(glyphs, folder)
    assert predict([folder, '--model', glyphs['run'], '--out-dir', folder], capsys)[0] == 0
    assert [os.path.basename(r['file']) for r in read_csv(folder / 'predictions.csv')] == ['one.png']
    assert predict([folder, '--model', glyphs['run'], '--out-dir', folder], capsys)[0] == 2  # nor written over


def test_subfolders_are_read_and_what_is_no_picture_is_left_out(glyphs, glyph_md5, tmp_path, capsys):
    tree = tmp_path / 'tree'
    one_photo(glyphs, tree / '0', 'a.png', 0)
    one_photo(glyphs, tree / '1', 'b.png', 1)
    (tree / '._a.png').write_bytes(b'\x00\x05\x16\x07 macOS resource fork')
    (tree / 'notes.pdf').write_bytes(b'%PDF-1.4')
    code, _, err = predict([tree, '--model', glyphs['run'], '--out-dir', tmp_path / 'out'], capsys)
    assert code == 0 and err == ''
    assert [r['file'] for r in read_csv(tmp_path / 'out' / 'predictions.csv')] == [f'{tree}/0/a.png',
                                                                                    f'{tree}/1/b.png']


def test_a_bare_state_dict_is_a_model_but_not_a_broken_one(glyphs, glyph_md5, tmp_path, capsys):
    weights = torch.load(glyphs['run'] / 'model.pt', weights_only=True)['model']
    torch.save(weights, tmp_path / 'weights.pt')
    code, out, _ = predict([one_photo(glyphs, tmp_path / 'in'), '--model', tmp_path / 'weights.pt', '--out-dir',
                            tmp_path / 'out'], capsys)
    assert code == 0 and f'model: {tmp_path / "weights.pt"} (test accuracy unknown: no summary.json of these ' in out
    weights['out.bias'][0] = float('nan')
    torch.save(weights, tmp_path / 'broken.pt')
    code, _, err = predict([tmp_path / 'in', '--model', tmp_path / 'broken.pt', '--out-dir', tmp_path / 'out2'],
                           capsys)
    assert code == 1 and 'holds weights this script never writes' in err


def test_reading_leaves_the_data_folder_as_it_was(glyphs, glyph_md5, tmp_path, capsys):
    raw = tmp_path / 'data' / 'MNIST' / 'raw'
    raw.mkdir(parents=True)
    (raw / 't10k-images-idx3-ubyte.gz').write_bytes(b'\x1f\x8b damaged')
    predict([one_photo(glyphs, tmp_path / 'in'), '--model', glyphs['run'], '--data-dir', tmp_path / 'data',
             '--out-dir', tmp_path / 'out'], capsys)
    assert sorted(p.name for p in raw.iterdir()) == ['t10k-images-idx3-ubyte.gz']


def test_specks_too_far_apart_for_a_digit_are_said_so(tmp_path):
    page = np.full((2000, 2000), 230, dtype=np.uint8)
    page[10:13, 10:13] = page[1985:1988, 1985:1988] = 20
    with pytest.raises(ValueError, match='no ink left at 20 pixels'):
        pd.mnist_like(Image.fromarray(page))


def test_a_large_photo_below_pillows_bomb_limit_is_read(glyphs, glyph_md5, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 10_000)  # a 130x110 photo is then like a 108 MP one
    code, _, err = predict([one_photo(glyphs, tmp_path / 'in'), '--model', glyphs['run'], '--out-dir',
                            tmp_path / 'out'], capsys)
    assert code == 0 and err == ''


@pytest.mark.parametrize('now', ['a bomb', 'damaged', 'gone'])
def test_an_image_changed_after_it_was_read_is_a_blank_in_the_picture(tmp_path, monkeypatch, now):
    path = tmp_path / 'a.png'
    Image.fromarray(np.full((200, 200), 128, dtype=np.uint8)).save(path)
    if now == 'a bomb':
        monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 10_000)  # Pillow refuses above twice this
    elif now == 'damaged':
        path.write_bytes(path.read_bytes()[:60])
    else:
        path.unlink()
    shown = [(0.5, 0, str(path), np.zeros((28, 28), np.uint8), np.full(10, 0.1), torch.rand(1568))]
    canvas = pd.draw_predictions(shown, 1, None).axes[0].images[0].get_array()
    assert np.array_equal(canvas[:, :96], np.full((96, 96, 3), 255, dtype=np.uint8))


def test_a_file_name_with_dollars_is_drawn_as_written(glyphs, glyph_md5, tmp_path, capsys):
    """matplotlib reads $...$ as mathematics, and an odd number of $ as a syntax error."""
    code, _, _ = predict([one_photo(glyphs, tmp_path / 'in', 'price_$5_$.png'), one_photo(glyphs, tmp_path / 'in',
                         'a$b.png', 1), '--model', glyphs['run'], '--out-dir', tmp_path / 'out'], capsys)
    assert code == 0 and (tmp_path / 'out' / 'predictions.png').exists()


def test_a_link_to_nothing_in_a_folder_is_named(glyphs, glyph_md5, tmp_path, capsys):
    folder = tmp_path / 'in'
    one_photo(glyphs, folder)
    os.symlink(tmp_path / 'gone.png', folder / 'moved.png')
    code, _, err = predict([folder, '--model', glyphs['run'], '--out-dir', tmp_path / 'out'], capsys)
    assert code == 1 and err == f'{folder}/moved.png: a link to nothing\n'


def test_a_reader_that_takes_one_line_costs_no_output(glyphs, tmp_path, fixture_checksums):
    """`predict_digits.py digits 2>&1 | head -1`: the rest of the lines have nowhere to go; the files still do."""
    folder = tmp_path / 'in'
    one_photo(glyphs, folder)
    (folder / 'bad.png').write_text('not pixels')
    one_photo(glyphs, folder, 'two.png', 1)
    process = run_script([folder, '--model', glyphs['run'], '--out-dir', tmp_path / 'out'], fixture_checksums,
                         script=PREDICT_SCRIPT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    process.stdout.readline()
    process.stdout.close()  # as `head -1` does
    assert process.wait(timeout=120) == 1  # an image could not be read
    assert len(read_csv(tmp_path / 'out' / 'predictions.csv')) == 2


def test_a_name_beyond_ascii_is_written_to_the_table_in_an_ascii_locale(glyphs, tmp_path, fixture_checksums):
    """predictions.csv is UTF-8 whatever the locale's encoding (LC_ALL=C, or Windows' code page)."""
    photo = one_photo(glyphs, tmp_path / 'in', 'sieben_\u00fc.png')
    done = run_script([photo, '--model', glyphs['run'], '--out-dir', tmp_path / 'out'], fixture_checksums, timeout=120,
                      script=PREDICT_SCRIPT, env={'LC_ALL': 'C', 'PYTHONUTF8': '0', 'PYTHONCOERCECLOCALE': '0'})
    assert (done.returncode, done.stderr) == (0, '')
    with open(tmp_path / 'out' / 'predictions.csv', encoding='utf-8') as f:
        assert next(csv.DictReader(f))['file'] == str(photo)


def test_a_closed_stdout_costs_nothing(glyphs, tmp_path, fixture_checksums):
    """`predict_digits.py digits >&-`: Python's sys.stdout is None; the files are written all the same."""
    folder = tmp_path / 'in'
    one_photo(glyphs, folder)
    process = run_script([folder, '--model', glyphs['run'], '--out-dir', tmp_path / 'out'], fixture_checksums,
                         script=PREDICT_SCRIPT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=lambda: os.close(1))
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0 and err == b''
    assert len(read_csv(tmp_path / 'out' / 'predictions.csv')) == 1


def test_earlier_runs_folders_among_the_inputs_are_not_read(glyphs, glyph_md5, tmp_path, monkeypatch, capsys):
    folder = tmp_path / 'in'
    one_photo(glyphs, folder)
    shutil.copytree(glyphs['run'], folder / 'trained')  # a trainer's run folder: curves.png and the rest
    monkeypatch.chdir(folder)
    for _ in range(2):  # the first run's runs/<stamp>/predictions.png is not read by the second
        code, _, err = predict(['.', '--model', 'trained'], capsys)
        assert code == 0 and err == ''
    newest = max(folder.glob('runs/*/predictions.csv'), key=os.path.getmtime)
    assert [r['file'] for r in read_csv(newest)] == ['./one.png']


def test_an_output_folder_holding_predictions_is_refused(glyphs, glyph_md5, tmp_path, capsys):
    out = tmp_path / 'out'
    assert predict([one_photo(glyphs, tmp_path / 'in'), '--model', glyphs['run'], '--out-dir', out], capsys)[0] == 0
    before = {name: (out / name).read_bytes() for name in ('predictions.csv', 'predictions.png')}
    code, _, err = predict([tmp_path / 'in', '--model', glyphs['run'], '--out-dir', out], capsys)
    assert code == 2 and err == (f'usage error: {out} already holds predictions.csv, which this run would write '
                                 'over: choose another --out-dir\n')
    assert {name: (out / name).read_bytes() for name in before} == before


def test_a_photo_with_damaged_exif_is_read_without_pillows_warnings(glyphs, glyph_md5, tmp_path, capsys):
    photo = photo_like(glyphs['test_images'][0])
    exif = photo.getexif()
    exif[0x0112] = 1  # an orientation, whose entry then claims more data than the file holds
    photo.save(tmp_path / 'phone.jpg', exif=exif)
    data = bytearray((tmp_path / 'phone.jpg').read_bytes())
    entry = data.index(b'\x01\x12\x00\x03')
    data[entry + 4:entry + 8] = b'\x00\x00\x7f\xff'
    (tmp_path / 'phone.jpg').write_bytes(data)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always')
        code, out, err = predict([tmp_path / 'phone.jpg', '--model', glyphs['run'], '--out-dir', tmp_path / 'out'],
                                 capsys)
    assert code == 0 and err == '' and [str(w.message) for w in seen] == []


def test_an_image_too_large_for_the_memory_left_is_a_line(glyphs, glyph_md5, tmp_path, monkeypatch, capsys):
    real = pd.mnist_like

    def short_of_memory(image):
        if image.size == (60, 60):
            raise MemoryError
        return real(image)
    monkeypatch.setattr(pd, 'mnist_like', short_of_memory)
    one_photo(glyphs, tmp_path / 'in')
    Image.new('L', (60, 60), 230).save(tmp_path / 'in' / 'huge.png')
    code, out, err = predict([tmp_path / 'in', '--model', glyphs['run'], '--out-dir', tmp_path / 'out'], capsys)
    assert code == 1 and err == f'{tmp_path}/in/huge.png: too large for the memory left\n'
    assert 'done: 1 image predicted' in out


def test_a_second_stop_signal_ends_at_once_while_an_image_is_read(glyphs, tmp_path):
    one_photo(glyphs, tmp_path / 'in')
    slow_read = ('import os, signal, time, predict_digits as pd, train_mnist_cnn as tm\n'
                 'def read(path):  # a large image: a first signal comes while it is read, a second soon after\n'
                 '    for signum in (signal.SIGINT, signal.SIGTERM):\n'
                 '        time.sleep(0.5)\n'
                 '        os.kill(os.getpid(), signum)\n'
                 '    time.sleep(60)\n'
                 'pd.read_entry = read\n'
                 f'tm.exit_with(pd.main([{str(tmp_path / "in")!r}, "--model", {str(glyphs["run"])!r}]))\n')
    out = subprocess.run([sys.executable, '-c', slow_read], cwd=tmp_path, capture_output=True, text=True, timeout=30,
                         env={**os.environ, 'PYTHONPATH': ROOT, 'MPLBACKEND': 'Agg'})
    assert out.returncode == 143 and 'Traceback' not in out.stderr


def test_a_large_jpeg_is_decoded_at_a_fraction_of_its_size(glyphs, glyph_md5, tmp_path, monkeypatch, capsys):
    from PIL import JpegImagePlugin
    photo_like(glyphs['test_images'][0], scale=60, offset=(300, 200), size=(2400, 2100)).save(tmp_path / 'big.jpg')
    sizes, real_draft, real = [], JpegImagePlugin.JpegImageFile.draft, pd.mnist_like

    def draft(image, *args):
        result = real_draft(image, *args)
        sizes.append(image.size)
        return result

    def prepared(image):
        sizes.append(image.size)
        return real(image)
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, 'draft', draft)
    monkeypatch.setattr(pd, 'mnist_like', prepared)
    code, out, _ = predict([tmp_path / 'big.jpg', '--model', glyphs['run'], '--out-dir', tmp_path / 'out'], capsys)
    assert code == 0 and sizes[0] == (1200, 1050) and (1024, 896) in sizes  # decoded at half (the smallest scale
    # that keeps 1024 pixels a side), then shrunk to fit 1024x1024
    assert f'big.jpg: {glyphs["predicted"][0]} (' in out


def test_threads_bounds_the_image_readers_too(glyphs, glyph_md5, tmp_path, monkeypatch, capsys):
    photo_like(glyphs['test_images'][0]).save(tmp_path / 'seven.png')
    workers, real, threads = [], pd.concurrent.futures.ThreadPoolExecutor, torch.get_num_threads()
    monkeypatch.setattr(os, 'cpu_count', lambda: 8)  # (on a one-core machine the old readers were one too)
    monkeypatch.setattr(pd.concurrent.futures, 'ThreadPoolExecutor', lambda n: workers.append(n) or real(n))
    try:
        code, _, _ = predict([tmp_path / 'seven.png', '--threads', '1', '--model', glyphs['run'], '--out-dir',
                              tmp_path / 'out'], capsys)
    finally:
        torch.set_num_threads(threads)
    assert code == 0 and workers == [1]


def crafted_dds(path):
    """A DDS whose pixel format flags are zero: Pillow opens it and then raises NotImplementedError."""
    Image.new('RGBA', (8, 8), 'white').save(path)
    data = bytearray(path.read_bytes())
    data[80:84] = bytes(4)
    path.write_bytes(bytes(data))


def exif_that_cannot_be_written_back(photo, path):
    """A JPEG whose EXIF holds text under a tag that Pillow writes as a fraction, beside an orientation: turning it
    upright, Pillow writes the EXIF back and fails on it."""
    exif = Image.Exif()
    exif[0x0112], exif[0x0131] = 6, 'software'
    raw = exif.tobytes().replace(b'\x01\x31\x00\x02', b'\x01\x1f\x00\x02')  # the text retagged as YPosition
    photo.save(path, exif=raw)


def test_files_pillow_fails_on_in_its_own_ways_are_a_line_or_read_as_stored(glyphs, glyph_md5, tmp_path, capsys):
    folder = tmp_path / 'in'
    folder.mkdir()
    crafted_dds(folder / 'a-crafted.dds')
    exif_that_cannot_be_written_back(photo_like(glyphs['test_images'][0]), folder / 'b-phone.jpg')
    one_photo(glyphs, folder, 'c-good.png', 1)
    code, out, err = predict([folder, '--model', glyphs['run'], '--out-dir', tmp_path / 'out'], capsys)
    assert code == 1 and err.startswith(f'{folder}/a-crafted.dds: cannot be read (') and len(err.splitlines()) == 1
    assert [os.path.basename(r['file']) for r in read_csv(tmp_path / 'out' / 'predictions.csv')] == \
        ['b-phone.jpg', 'c-good.png']


def test_a_large_image_is_shrunk_to_1024_pixels_before_it_is_prepared(glyphs, glyph_md5, tmp_path, monkeypatch,
                                                                       capsys):
    photo_like(glyphs['test_images'][0], scale=60, offset=(300, 200), size=(3000, 2100)).save(tmp_path / 'big.png')
    scan = photo_like(glyphs['test_images'][2], scale=60, offset=(300, 200), size=(2100, 2100)).convert('L')
    Image.fromarray(np.asarray(scan) > 120).save(tmp_path / 'scan.png')  # bilevel, as a fax or a scanner makes
    sizes, real = [], pd.mnist_like

    def prepared(image):
        sizes.append(image.size)
        return real(image)
    monkeypatch.setattr(pd, 'mnist_like', prepared)
    code, out, _ = predict([tmp_path / 'big.png', tmp_path / 'scan.png', '--model', glyphs['run'], '--out-dir',
                            tmp_path / 'out'], capsys)
    assert code == 0 and sorted(sizes) == [(1024, 717), (1024, 1024)]
    assert f'big.png: {glyphs["predicted"][0]} (' in out and f'scan.png: {glyphs["predicted"][2]} (' in out


def test_a_folder_given_twice_does_not_read_the_picture_written_into_it(glyphs, glyph_md5, tmp_path, capsys):
    folder = tmp_path / 'in'
    one_photo(glyphs, folder)
    assert predict([folder, '--model', glyphs['run'], '--out-dir', folder], capsys)[0] == 0
    assert predict([folder, '--model', glyphs['run'], '--out-dir', tmp_path / 'out'], capsys)[0] == 0
    assert [os.path.basename(r['file']) for r in read_csv(tmp_path / 'out' / 'predictions.csv')] == ['one.png']


def test_a_subfolder_holding_a_file_named_as_a_runs_summary_is_still_read(glyphs, glyph_md5, tmp_path, capsys):
    one_photo(glyphs, tmp_path / 'in' / 'batch', 'a.png')
    (tmp_path / 'in' / 'batch' / 'summary.json').write_text('{}')
    (tmp_path / 'in' / 'batch' / 'metrics.csv').write_text('x\n')
    assert predict([tmp_path / 'in', '--model', glyphs['run'], '--out-dir', tmp_path / 'out'], capsys)[0] == 0
    assert [os.path.basename(r['file']) for r in read_csv(tmp_path / 'out' / 'predictions.csv')] == ['a.png']


def test_a_broken_model_pt_among_the_runs_is_passed_over_by_the_default(glyphs, glyph_md5, tmp_path, monkeypatch,
                                                                        capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(glyphs['run'], tmp_path / 'runs' / 'good')
    (tmp_path / 'runs' / 'gone').mkdir()
    (tmp_path / 'runs' / 'gone' / 'model.pt').symlink_to(tmp_path / 'nothing')
    (tmp_path / 'runs' / 'folder' / 'model.pt').mkdir(parents=True)
    code, out, err = predict([one_photo(glyphs, tmp_path / 'in')], capsys)
    assert code == 0 and err == '' and out.startswith('model: runs/good/model.pt (')


def test_a_pipe_planted_as_a_runs_summary_does_not_hang_the_default(glyphs, glyph_md5, tmp_path, monkeypatch, capsys):
    """The default model's lookup reads every run's summary.json: one that is a named pipe is no summary."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(glyphs['run'], tmp_path / 'runs' / 'piped')
    (tmp_path / 'runs' / 'piped' / 'summary.json').unlink()
    os.mkfifo(tmp_path / 'runs' / 'piped' / 'summary.json')
    photo, codes = one_photo(glyphs, tmp_path / 'in'), []
    reader = threading.Thread(target=lambda: codes.append(pd.main([str(photo)])), daemon=True)
    reader.start()
    reader.join(timeout=60)
    assert codes == [0] and capsys.readouterr().out.startswith('model: runs/piped/model.pt (test accuracy unknown')


def test_when_no_image_can_be_read_nothing_is_written(glyphs, glyph_md5, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = predict(['nosuch.png', '--model', glyphs['run']], capsys)
    assert code == 1 and err == 'nosuch.png: no such file\nerror: no image could be read: nothing was written\n'
    assert not (tmp_path / 'runs').exists()


@pytest.mark.parametrize('mode', ['1', 'L', 'P', 'LA', 'RGB', 'RGBA', 'CMYK', 'LAB', 'YCbCr'])
def test_a_photo_in_any_of_pillows_modes_is_read_as_the_same_digit(glyphs, tmp_path, mode):
    photo = photo_like(glyphs['test_images'][0], paper=220, ink=20)
    as_taken = pd.mnist_like(photo)
    photo = (Image.fromarray(np.asarray(photo.convert('L')) > 120) if mode == '1' else
             photo.quantize(32, dither=Image.Dither.NONE) if mode == 'P' else photo.convert(mode))
    photo.save(tmp_path / 'photo.tiff')
    seen = pd.mnist_like(pd.opened_image(tmp_path / 'photo.tiff'))
    assert np.corrcoef(seen.ravel(), as_taken.ravel())[0, 1] > 0.9 and as_taken[0, 0] == seen[0, 0] == 0


def test_a_16_bit_scan_of_a_page_is_shrunk_and_read(glyphs, tmp_path):
    photo = photo_like(glyphs['test_images'][0], scale=60, offset=(500, 700), size=(2480, 3508))
    Image.fromarray(np.asarray(photo.convert('L')).astype(np.uint16) * 257).save(tmp_path / 'scan16.png')
    seen = pd.mnist_like(pd.opened_image(tmp_path / 'scan16.png'))
    assert np.corrcoef(seen.ravel(), pd.mnist_like(photo).ravel())[0, 1] > 0.9


@pytest.mark.parametrize('mode', ['1', 'P', 'PA'])
def test_a_large_bilevel_or_palette_image_keeps_its_thin_strokes_and_its_transparency(tmp_path, mode):
    drawing = Image.new('L', (4000, 4000), 255)
    ImageDraw.Draw(drawing).line([(1200, 1002), (2800, 1002), (1600, 3000)], fill=0, width=2)  # a thin 7
    if mode == 'PA':  # dark strokes on transparent pixels, in a palette (Pillow before 12 would drop the alpha of an
        canvas = Image.new('P', drawing.size)  # RGBA image converted to PA)
        canvas.putalpha(Image.fromarray(255 - np.asarray(drawing)))
        canvas.save(tmp_path / 'drawing.tiff')
    else:
        drawing.convert(mode, dither=Image.Dither.NONE).save(tmp_path / 'drawing.png')
    seen = pd.mnist_like(pd.opened_image(next(tmp_path.glob('drawing.*'))))
    assert np.corrcoef(seen.ravel(), pd.mnist_like(drawing).ravel())[0, 1] > 0.8


def vignetted(photo, darkest):
    """The photo darker towards its corners, as a lens makes it: the centre as it was, the corners at `darkest`."""
    sheet = np.asarray(photo.convert('L'), dtype=float)
    rows, cols = np.indices(sheet.shape)
    falloff = np.hypot(rows / sheet.shape[0] - 0.5, cols / sheet.shape[1] - 0.5) / np.sqrt(0.5)  # 0 to 1 at a corner
    return Image.fromarray((sheet * (1 - falloff * (1 - darkest / sheet.max()))).astype(np.uint8))


@pytest.mark.parametrize('what', ['one white pixel', 'a glare', 'a vignette', 'a milder vignette'])
def test_what_lies_on_the_paper_does_not_turn_the_ink_around(glyphs, what):
    digit = glyphs['test_images'][5]
    photo = photo_like(digit, paper=140 if 'vignette' not in what else 240, ink=40, offset=(158, 108),
                       size=(400, 300))
    if what == 'a vignette' or what == 'a milder vignette':
        photo = vignetted(photo, 140 if what == 'a vignette' else 170)
    else:
        photo = np.asarray(photo.convert('L')).copy()
        if what == 'a glare':
            photo[40:80, 40:70] = 255
        else:
            photo[20, 20] = 255
        photo = Image.fromarray(photo)
    seen = pd.mnist_like(photo)
    assert np.corrcoef(seen.ravel(), digit.ravel())[0, 1] > 0.9


def test_a_dry_runs_model_is_not_the_default(glyphs, glyph_md5, tmp_path, monkeypatch, capsys):
    """The README's test command ends with a dry run, whose two steps read digits at about 20%: never the default."""
    monkeypatch.chdir(tmp_path)
    for name, when in (('trained', 1_000_000_000), ('dry', 1_500_000_000)):
        shutil.copytree(glyphs['run'], tmp_path / 'runs' / name)
        os.utime(tmp_path / 'runs' / name / 'model.pt', (when, when))
    summary = json.loads((glyphs['run'] / 'summary.json').read_text())
    (tmp_path / 'runs' / 'dry' / 'summary.json').write_text(json.dumps({**summary, 'dry_run': True}))
    code, out, _ = predict([one_photo(glyphs, tmp_path / 'in')], capsys)
    assert code == 0 and out.startswith('model: runs/trained/model.pt (test accuracy ')
    code, out, _ = predict([one_photo(glyphs, tmp_path / 'in'), '--model', 'runs/dry'], capsys)
    assert code == 0 and out.startswith('model: runs/dry/model.pt (test accuracy ')  # named: used


def test_a_linked_checkpoint_is_read_with_its_runs_summary_and_film(glyphs, glyph_md5, tmp_path, capsys):
    (tmp_path / 'model.pt').symlink_to(glyphs['run'] / 'model.pt')
    code, out, _ = predict([one_photo(glyphs, tmp_path / 'in'), '--model', tmp_path / 'model.pt', '--data-dir',
                            glyphs['data'], '--out-dir', tmp_path / 'out'], capsys)
    assert code == 0 and out.startswith(f'model: {tmp_path}/model.pt (test accuracy ') and 'note:' not in out
