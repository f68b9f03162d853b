#!/usr/bin/env python3
# /// script
# requires-python = ">=3.11"
# dependencies = [
#     "torch>=2.4",
#     "matplotlib>=3.9",
# ]
# ///
"""Read your own handwritten digits with a CNN that train_mnist_cnn.py trained.

    python predict_digits.py my-digits/              # photos, scans, drawings: files or folders
    python predict_digits.py 7.png --model runs/XYZ  # a run folder or a checkpoint; default: the newest run

Each image is prepared the way MNIST's digits were made, then predicted: a line per image, and in its own folder
(runs/<UTC timestamp> by default) predictions.csv and predictions.png. Exit codes: 0 done, 1 an image could not
be read or a runtime error, 2 usage error, 129/130/143 interrupted.
"""
import concurrent.futures
import contextlib
import csv
import enum
import glob
import itertools
import math
import os
import signal
import sys
import time
import warnings
import zipfile


def stop_while_starting(signum, frame):  # as the trainer's, which cannot be imported before torch
    os.write(2, b'interrupted while starting; nothing was written\n')
    os._exit(128 + signum)


if __name__ == '__main__':  # a signal while torch is imported (the first seconds): one line, not a traceback
    for signum in (signal.SIGINT, signal.SIGTERM, getattr(signal, 'SIGHUP', None)):  # (as the trainer's stop_signals)
        if signum is not None and signal.getsignal(signum) != signal.SIG_IGN:  # one started ignored stays ignored
            signal.signal(signum, stop_while_starting)

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # the trainer beside it, under python -P or -I too
import train_mnist_cnn as tm
from train_mnist_cnn import CNN, to_unit_range

MIN_INK_CONTRAST = 40  # grey levels between the paper and the darkest ink below which an image is blank
PAPER_NOISE = 0.1      # the share of the ink's contrast below which a pixel is paper
INK_FOR_THE_BOX = 0.3  # and the share from which it counts towards the ink's box
PREDICT_BATCH = 256    # images read and predicted at a time: memory stays flat however many there are
PICTURE_MOST = 32      # images shown in predictions.png, the least confident first


def mnist_like(image):
    """A digit image (PIL, as opened_image gives it) prepared as MNIST's digits were (LeCun, Cortes and Burges): light
    ink on black, the ink's box scaled so its longer side is 20 pixels (aspect kept, antialiased) and its strongest ink
    full, placed in 28x28 with its centre of mass on pixel (14, 14), where MNIST's lie (14.0 +- 0.3). 28x28 uint8."""
    if image.mode in ('I', 'F') or image.mode.startswith('I;16'):  # a 16-bit or float scan: its own range,
        grey = np.asarray(image, dtype=np.float64)  # not clipped to 8 bits
        if not np.isfinite(grey).all():  # (a float scan's NaN would make every level NaN)
            raise ValueError('its pixels are not all finite numbers (NaN or infinity)')
        grey = (grey - grey.min()) * (255 / max(float(grey.max() - grey.min()), 1e-12))
    else:
        grey = np.asarray(image.convert('RGB').convert('L'), dtype=np.float32)  # (Pillow takes LAB to grey via RGB)
    paper = np.median(np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]]))  # read at the image's edge
    if paper > 127:  # light paper: the ink becomes light on dark, as in MNIST. (Rules that weigh the ink against
        grey, paper = 255 - grey, 255 - paper  # the paper turned a vignetted photo, or a glare on grey paper, around)
    ink = grey.max()
    if ink - paper < MIN_INK_CONTRAST:
        raise ValueError('no ink: the image is blank')
    level = np.clip((grey - paper) / (ink - paper), 0, 1)
    level[level < PAPER_NOISE] = 0  # the paper's grain and the compression's speckle
    digit = Image.fromarray(np.round(level * 255).astype(np.uint8))
    digit = digit.crop(Image.fromarray(level >= INK_FOR_THE_BOX).getbbox())  # a faint speck far off is not ink
    scale = 20 / max(digit.size)  # its longer side 20 pixels, aspect kept (and a thin 1 at least a pixel wide)
    digit = digit.resize(tuple(max(1, round(side * scale)) for side in digit.size), Image.Resampling.LANCZOS)
    weights = np.asarray(digit, dtype=np.float64)
    if not weights.any():
        raise ValueError('no ink left at 20 pixels: the marks are too small or too far apart for a digit')
    weights *= 255 / weights.max()  # a thin stroke, which shrinking dimmed, at full ink again as MNIST's strokes are
    centre_row, centre_col = (np.indices(weights.shape) * weights).sum(axis=(1, 2)) / weights.sum()
    placed = Image.new('L', (28, 28))
    placed.paste(Image.fromarray(np.round(weights).astype(np.uint8)), (round(14 - centre_col), round(14 - centre_row)))
    return np.asarray(placed)


def opened_image(path):
    """Pillow's image at `path`: decoded, at most 1024x1024, upright (EXIF) and on white where transparent; or
    ValueError saying why. Shrunk first, so that what follows holds no full-size copy."""
    try:
        with Image.open(path) as image:
            image.draft(None, (1024, 1024))  # a JPEG decoded at 1/2 to 1/8 of its size where that leaves 1024 pixels:
            image.load()                     # a 48 MP photo in an eighth of the time and memory
        if image.mode in ('LA', 'PA') or 'transparency' in image.info:  # to modes Pillow shrinks by averaging
            image = image.convert('RGBA')
        elif image.mode in ('1', 'P') or image.mode.startswith('I;16'):
            image = image.convert({'1': 'L', 'P': 'RGB'}.get(image.mode, 'I'))  # (16-bit to 32-bit)
        image.thumbnail((1024, 1024))
        with contextlib.suppress(Exception):  # an EXIF too damaged for Pillow to write back: the image as stored
            image = ImageOps.exif_transpose(image)
        if image.mode == 'RGBA':  # a web canvas draws dark strokes on transparent pixels
            image = Image.alpha_composite(Image.new('RGBA', image.size, 'white'), image)
        return image
    except UnidentifiedImageError:
        raise ValueError('not an image Pillow can open') from None
    except Image.DecompressionBombError as e:
        raise ValueError(f'refused as a decompression bomb ({str(e).split(",")[0]})') from None
    except MemoryError:  # read_entry's to say
        raise
    except Exception as e:  # Pillow's words for a damaged or crafted file (OSError, NotImplementedError, ...)
        raise ValueError(f'cannot be read ({tm.one_line(e)})') from None


def images_to_read(paths):
    """Files as given; folders' images (Pillow's extensions, no hidden files), subfolders too but not runs' folders,
    in name order; a folder without any as itself."""
    extensions = {ext for ext, kind in Image.registered_extensions().items() if kind in Image.OPEN}
    for path in paths:
        found = 0
        for folder, subfolders, names in os.walk(path):  # (nothing for what is no folder)
            subfolders[:] = sorted(name for name in subfolders if not name.startswith('.') and not any(  # a run's
                os.path.exists(os.path.join(folder, name, file)) for file in ('model.pt', 'predictions.csv')))
            for name in sorted(names):
                file = os.path.join(folder, name)
                if not name.startswith('.') and os.path.splitext(name)[1].lower() in extensions \
                        and not (name == 'predictions.png' and 'predictions.csv' in names) \
                        and (os.path.isfile(file) or os.path.islink(file)):
                    found += 1
                    yield file
        if not found:
            yield path


def read_entry(path):
    """(path, the 28x28 seen) for an image read, (path, why) for one that cannot be."""
    if not os.path.isfile(path):
        return path, ('a folder with no image Pillow opens' if os.path.isdir(path) else 'not a file (a pipe, a device?)'
                      if os.path.exists(path) else 'a link to nothing' if os.path.islink(path) else 'no such file')
    try:
        return path, mnist_like(opened_image(path))
    except (ValueError, MemoryError) as e:
        return path, str(e) or 'too large for the memory left'


def predict_all(model, device, entries, rows, log, threads):
    """Predicts the images a batch at a time, a line and a CSV row each; returns the counts and the least confident."""
    counts, shown = {'read': 0, 'failed': 0}, []
    rows.writerow(['file', 'predicted', *(f'p{digit}' for digit in range(10))])
    readers = concurrent.futures.ThreadPoolExecutor(threads)  # Pillow decodes and resizes off the GIL
    try:
        for batch in iter(lambda: list(itertools.islice(entries, PREDICT_BATCH)), []):
            read = []
            for path, result in readers.map(read_entry, batch):
                if isinstance(result, str):
                    tm.say(f'{printable(path)}: {result}', error=True)
                    counts['failed'] += 1
                else:
                    read.append((path, result))
            if not read:
                continue
            images = torch.from_numpy(np.stack([seen for _, seen in read])).unsqueeze(1).to(device)
            with torch.inference_mode():
                logits, features = model(to_unit_range(images))
            probabilities = logits.float().softmax(1).cpu().numpy()
            for (path, seen), p, feature in zip(read, probabilities, features.cpu()):
                top = p.argsort()[::-1][:3]
                log(f'{printable(path)}: ' + ' | '.join(f'{d} ({p[d]:.1%})' for d in top))
                rows.writerow([printable(path), top[0], *(f'{x:.6f}' for x in p)])
                shown.append((p[top[0]], counts['read'], path, seen, p, feature))
                counts['read'] += 1
            shown = sorted(shown, key=lambda entry: entry[:2])[:PICTURE_MOST]  # the least confident
    finally:
        readers.shutdown(cancel_futures=True)  # the reads begun are waited for here, where a second Ctrl-C exits
    return counts, shown


def printable(path):
    """A path on one line that UTF-8 can print: bytes that are no UTF-8 as \\xNN, unprintable characters escaped."""
    text = path.encode('utf-8', 'surrogateescape').decode('utf-8', 'backslashreplace')
    return ''.join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def film_for_predictions(run_dir, data_dir, model, device, log, neighbours=10):
    """The run's last t-SNE frame and the features of the test images it shows, or None and a note saying why."""
    path = os.path.join(run_dir, 'tsne.npz')
    if not os.path.isfile(path):
        log(f'note: no t-SNE panel: {run_dir} has no tsne.npz (it was trained with --no-tsne, or did not finish)')
        return None
    files, problems = tm.read_mnist(tm.raw_folder(data_dir), lambda message: None, unpack=False,  # (writes nothing)
                                    names=('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'))  # (the test set's)
    if problems:
        log(f'note: no t-SNE panel: the test images it shows are not in --data-dir {data_dir} ({problems[0]})')
        return None
    try:
        with np.load(path) as film:
            embedding, labels = film['embeddings'][-1].astype(np.float64), film['labels'].astype(np.int64)
        if embedding.shape != (len(labels), 2) or labels.ndim != 1:
            raise ValueError('its frames and labels do not fit together')
        if not (np.abs(embedding) < 2**63).all():  # (the trainer's bound: the sums drawn from them stay finite)
            raise ValueError('its last frame holds points that are not finite, or far out')
        if len(labels) < neighbours:
            raise ValueError(f'it shows {len(labels)} images, fewer than the {neighbours} an image is placed by')
    except (OSError, ValueError, KeyError, IndexError, EOFError, zipfile.BadZipFile, MemoryError) as e:
        log(f'note: no t-SNE panel: {path} cannot be read ({tm.one_line(e, 100)})')
        return None
    if not np.array_equal(tm.idx_tensor(files['t10k-labels-idx1-ubyte'])[:len(labels)].numpy(), labels):
        log(f'note: no t-SNE panel: the test images in --data-dir {data_dir} are not the ones its film shows')
        return None
    test_images = tm.idx_tensor(files['t10k-images-idx3-ubyte'])[:len(labels)].unsqueeze(1).to(device)
    with torch.inference_mode():
        _, features = model(to_unit_range(test_images))
    return {'embedding': embedding, 'labels': labels, 'features': features.cpu(), 'neighbours': neighbours}


def draw_predictions(shown, total, film):
    """predictions.png: each image as given, the 28x28 the network saw and its top three; beside them the run's last
    t-SNE frame, each image placed at the mean position of its nearest test images in the 1568-d feature space."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    cols, rows = max(2, min(4, len(shown))), math.ceil(len(shown) / 4)  # (two at least: room for the title)
    fig = Figure(figsize=(3.2 * cols + (6.4 if film else 0), 1.9 * rows + 0.8), layout='constrained')
    cells, panel = (fig.subfigures(1, 2, width_ratios=[3.2 * cols, 6.4]) if film else (fig, None))
    axes = np.atleast_1d(cells.subplots(rows, cols)).ravel()
    for number, ((confidence, _, path, seen, p, _), ax) in enumerate(zip(shown, axes), 1):
        canvas = np.full((96, 200, 3), 255, dtype=np.uint8)
        with contextlib.suppress(ValueError):  # the image as given, read again (only the shown few need it), unless
            given = opened_image(path).convert('RGB')  # it changed on disk since it was read
            given.thumbnail((96, 96))
            canvas[:given.height, :given.width] = np.asarray(given)
        canvas[:84, 112:196] = np.repeat(np.repeat(seen, 3, 0), 3, 1)[..., None]  # the 28x28, 3x and crisp
        ax.imshow(canvas)
        top = p.argsort()[::-1][:3]
        ax.set_title(f'#{number} {printable(os.path.basename(path))[:22]}', fontsize=8, parse_math=False)  # '$' too
        ax.set_xlabel('  '.join(f'{d}: {p[d]:.1%}' for d in top), fontsize=8)
        ax.set(xticks=[], yticks=[])
    for ax in axes[len(shown):]:
        ax.axis('off')
    cells.suptitle(f'{total} image{"s" * (total != 1)} predicted; the {len(shown)} least confident shown '
                   '(as given, and the 28x28 the network saw)', fontsize=9)
    if film:
        ax = panel.subplots()
        colours = colormaps['rainbow'](np.linspace(0, 1, 10))
        embedding = film['embedding']
        ax.scatter(*embedding.T, s=30, marker='s', c=colours[film['labels']], linewidths=0, alpha=0.6)
        for digit in np.unique(film['labels']):  # each cluster named by its digit, at the middle of its points
            ax.text(*np.median(embedding[film['labels'] == digit], axis=0), str(digit), fontsize=16, weight='bold',
                    color=colours[digit] * [0.6, 0.6, 0.6, 1], ha='center', va='center')
        features = torch.stack([entry[5] for entry in shown])
        nearest = torch.cdist(features, film['features']).topk(film['neighbours'], largest=False).indices
        for number, position in enumerate(embedding[nearest.numpy()].mean(1), 1):
            ax.scatter(*position, s=260, marker='*', color='black', edgecolors='white', linewidths=0.8)
            ax.annotate(f'#{number}', position, xytext=(5, 5), textcoords='offset points', fontsize=9, weight='bold')
        ax.set(xticks=[], yticks=[], title="where each lands on the run's last t-SNE frame")
    return fig


# -----------------------------------------------------------------------------
# The model, the flags and main


def build_parser():
    parser = tm.ArgumentParser(prog='predict_digits.py',
                               description='Read digit images with a CNN that train_mnist_cnn.py trained.',
                               epilog='exit codes: 0 done, 1 an image could not be read or a runtime error, 2 usage '
                                      'error, 129/130/143 stopped by SIGHUP/SIGINT/SIGTERM.')
    parser.add_argument('images', nargs='+', type=tm.path_name, metavar='IMAGE_OR_FOLDER',
                        help='digit images, or folders of them (subfolders too)')
    parser.add_argument('--model', type=tm.path_name, metavar='PATH',
                        help="a checkpoint, or a run folder holding model.pt (default: the newest runs/*/model.pt, "
                             "not a dry run's)")
    parser.add_argument('--out-dir', type=tm.path_name, metavar='DIR',
                        help='where predictions.csv and predictions.png go (default: runs/<UTC timestamp>)')
    for name in ('device', 'threads', 'data_dir'):  # as the trainer takes them
        tm.add_flag(parser, name, default=getattr(tm.Config, name))
    return parser


class Stage(enum.Enum):
    PREDICTING = enum.auto()  # the images being read and predicted
    DRAWING = enum.auto()     # predictions.csv written, predictions.png being drawn


STOP_MESSAGES = {Stage.PREDICTING: 'interrupted while predicting; predictions.csv was not written',
                 Stage.DRAWING: 'interrupted while drawing predictions.png; predictions.csv is written in {out_dir}'}


def predict(args, status, log):
    """Every image read as MNIST was made, predicted, and reported; 1 if any could not be read."""
    device = tm.resolve_device(args.device, tm.World())
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = (file for file in glob.glob(os.path.join('runs', '*', 'model.pt'))  # files, and no dry run's: its two
            if os.path.isfile(file) and not tm.run_summary(os.path.dirname(file)).get('dry_run'))  # steps read 20%
    model_file = args.model or max(runs, key=os.path.getmtime, default='')
    if not model_file:
        raise tm.RunError('no trained model found (runs/*/model.pt): train one with `python train_mnist_cnn.py`, '
                          'or name one with --model')
    model_file = os.path.join(model_file, 'model.pt') if os.path.isdir(model_file) else model_file
    model = tm.to_device(CNN(), device).eval()
    checkpoint = tm.load_checkpoint(args.model or model_file, '--model', model_only=True)
    model.load_state_dict(checkpoint['model'])
    run_dir = os.path.dirname(os.path.realpath(model_file))  # (a link: its run's)
    summary = tm.run_summary(run_dir)  # the end of the run of these weights, not of other weights beside them
    of_these = tm.is_number(checkpoint.get('step'), int) and summary.get('steps') == checkpoint['step']
    accuracy = summary.get('test_accuracy') if of_these else None
    trained = (f'test accuracy {accuracy:.4f}' if tm.is_number(accuracy) and 0 <= accuracy <= 1
               else 'test accuracy unknown: no summary.json of these weights beside them')
    log(f'model: {model_file} ({trained})')
    with tm.claimed_folder(args.out_dir, refused=('predictions.csv', 'predictions.png')) as (out_dir, _):
        status.out_dir = out_dir
        picture = os.path.join(out_dir, 'predictions.png')
        started, entries = time.perf_counter(), images_to_read(args.images)
        with (tm.atomic_path(os.path.join(out_dir, 'predictions.csv')) as tmp,
              open(tmp, 'w', newline='', encoding='utf-8') as table):  # (UTF-8 whatever the locale)
            counts, shown = predict_all(model, device, entries, csv.writer(table), log, args.threads or os.cpu_count())
            if not counts['read']:
                raise tm.RunError('no image could be read: nothing was written')
        status.stage = Stage.DRAWING
        read, seconds = counts['read'], time.perf_counter() - started
        log(f'done: {read} image{"s" * (read != 1)} predicted in {seconds:.1f} s ({read / max(seconds, 1e-9):.0f} '
            f'images/s), {counts["failed"]} could not be read; files in {out_dir}')
        live = tm.interactive_backend(log)  # first: a backend that cannot work here is replaced by Agg
        film = film_for_predictions(run_dir, args.data_dir, model, device, log)
        tm.save_figure(draw_predictions(shown, read, film), picture)
        if tm.someone_at_the_terminal() and live:  # shown until its window is closed, or a stop signal
            tm.show_until_closed(status, picture)
    return tm.EXIT_RUNTIME if counts['failed'] else 0


def main(argv=None):
    """The script as a function: arguments in, an exit code out; every error a user can cause is one line."""
    status = tm.Status(stage=Stage.PREDICTING)
    with tm.signals_handled(status), warnings.catch_warnings():  # (which the readers' threads share)
        warnings.filterwarnings('ignore', module='PIL')  # a damaged EXIF, a large photo: it is read all the same
        try:
            return predict(build_parser().parse_args(argv), status, tm.make_logger(tm.World()))
        except BaseException as e:
            return tm.exit_code(e, status, tm.World(), STOP_MESSAGES)
        finally:
            status.stage = tm.Stage.STOPPING  # done: a signal now ends the process at once, quietly


if __name__ == '__main__':
    tm.exit_with(main())
