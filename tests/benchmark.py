#!/usr/bin/env python3
"""Speed of train_mnist_cnn.py in fp32 and bf16, measured side by side with the tutorial's pipeline and the floor.

    python tests/benchmark.py [--device cpu|cuda] [--epochs N] [--repeats N] [--data-dir DIR] [--json FILE]
    python tests/benchmark.py --film ...      # the t-SNE film's cost: ours animated against ours --no-tsne
    python tests/benchmark.py --seeds N ...   # one-epoch accuracy and time over seeds 1..N, fp32 and bf16
    python tests/benchmark.py --predict RUN   # the 10,000 test images as photos, read by predict_digits.py

In one run, on the same data and device, it measures the matmul peak (fp32 and bf16), counts the FLOPs of
one epoch (training steps, the periodic evaluations, the final test), then times whole processes,
alternated so that machine drift cancels (tutorial, floor, ours fp32, ours bf16, tutorial, ...), ours'
start-up (process start to the first step's log line) and the training phases alone:
- tutorial: torchvision MNIST with the per-sample ToTensor transform, DataLoader(batch 50, shuffle=True),
  the same CNN, Adam and loss, and one forward of the first 2000 test images every 50 steps.
- floor: a minimal process that imports, loads the same files into tensors on the device, and does the
  same steps over a randperm of them and the tutorial's evaluations (one forward of the first 2000
  test images every 50 steps, without autograd), with nothing else.
- ours: `python train_mnist_cnn.py --no-tsne [--precision bf16]` as a user runs it; for the training
  phase, its own functions (load_mnist, CNN, Adam, epoch_order, train_step) called in a loop.
Each figure is printed with the GFLOP/s it achieves and its share of the matching matmul peak. The data
must already be in DATA_DIR/MNIST/raw (run the script once). Not part of the pytest run.
"""
import argparse
import functools
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'train_mnist_cnn.py')
sys.path.insert(0, ROOT)  # the trainer's functions, which the pipelines and the checks call
BATCH, LR, LOG_EVERY, EVAL_SIZE, TRAIN_SIZE, TEST_SIZE = 50, 0.001, 50, 2000, 60000, 10000


# -----------------------------------------------------------------------------
# The pipelines, each run in a child process by `--role`

def sync(device):
    import torch
    if device.type == 'cuda':
        torch.cuda.synchronize()


def tutorial(data_dir, device, epochs):
    """The tutorial's code, brought to today's API and nothing more."""
    import torch
    import torch.nn as nn
    import torchvision
    from train_mnist_cnn import CNN
    torch.manual_seed(1)
    train_data = torchvision.datasets.MNIST(data_dir, train=True, transform=torchvision.transforms.ToTensor())
    train_loader = torch.utils.data.DataLoader(train_data, batch_size=BATCH, shuffle=True)
    test_data = torchvision.datasets.MNIST(data_dir, train=False)
    test_x = (torch.unsqueeze(test_data.data, dim=1).float()[:EVAL_SIZE] / 255.).to(device)
    test_y = test_data.targets[:EVAL_SIZE].to(device)
    cnn = CNN().to(device)
    optimizer = torch.optim.Adam(cnn.parameters(), lr=LR)
    loss_func = nn.CrossEntropyLoss()
    started = time.perf_counter()
    for epoch in range(epochs):
        for step, (b_x, b_y) in enumerate(train_loader):
            output = cnn(b_x.to(device))[0]
            loss = loss_func(output, b_y.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % LOG_EVERY == 0:
                test_output, _ = cnn(test_x)
                pred_y = torch.max(test_output, 1)[1]
                accuracy = float((pred_y == test_y).sum().item()) / float(test_y.size(0))
                print(f'Epoch: {epoch} | train loss: {loss.item():.4f} | test accuracy: {accuracy:.2f}', flush=True)
    sync(device)
    return time.perf_counter() - started


def floor(data_dir, device, epochs, evaluate=True):
    """The same steps and evaluations over tensors already on the device; the least a process can do.
    Without `evaluate`, the training steps alone."""
    import torch
    import torch.nn.functional as F
    import torchvision
    from train_mnist_cnn import CNN
    torch.manual_seed(1)
    train = torchvision.datasets.MNIST(data_dir, train=True)
    test = torchvision.datasets.MNIST(data_dir, train=False)
    images, labels = train.data.unsqueeze(1).to(device), train.targets.to(device)
    test_x, test_y = test.data[:EVAL_SIZE].unsqueeze(1).to(device), test.targets[:EVAL_SIZE].to(device)
    cnn = CNN().to(device)
    optimizer = torch.optim.Adam(cnn.parameters(), lr=LR)
    started = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(images), device=device)
        for step in range((len(images) + BATCH - 1) // BATCH):
            batch = order[step * BATCH:(step + 1) * BATCH]
            loss = F.cross_entropy(cnn(images[batch].float() / 255)[0], labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if evaluate and step % LOG_EVERY == 0:
                with torch.inference_mode():
                    correct = (cnn(test_x.float() / 255)[0].argmax(1) == test_y).sum()
                print(f'step {step} | loss {loss.item():.4f} | accuracy {correct.item() / EVAL_SIZE:.4f}', flush=True)
    sync(device)
    return time.perf_counter() - started


def ours_phase(data_dir, device, epochs, precision='fp32'):
    """Only our training steps, through the script's own functions."""
    import torch
    import train_mnist_cnn as tm
    tm.keep_freed_memory()  # as the script does before training
    mnist = tm.load_mnist(data_dir, False, tm.World(), lambda message: None)
    images, labels = mnist['train_images'].to(device), mnist['train_labels'].to(device)
    torch.manual_seed(1)
    model = tm.to_device(tm.CNN(), device)
    optimizer = tm.Adam(model.parameters(), LR)
    started = time.perf_counter()
    for epoch in range(epochs):
        order = tm.epoch_order(tm.draw_epoch_seed(), len(images)).to(device)
        for step in range((len(images) + BATCH - 1) // BATCH):
            batch = order[step * BATCH:(step + 1) * BATCH]
            tm.train_step(model, optimizer, images[batch], labels[batch], len(batch), 1, precision)
    sync(device)
    return time.perf_counter() - started


ROLES = {'tutorial': tutorial, 'floor': floor, 'ours_phase': ours_phase,
         'ours_phase_bf16': functools.partial(ours_phase, precision='bf16'),
         'floor_phase': functools.partial(floor, evaluate=False)}


def run_role(role, data_dir, device_name, epochs):
    import torch
    seconds = ROLES[role](data_dir, torch.device(device_name), epochs)
    print(json.dumps({'role': role, 'seconds': seconds}))


# -----------------------------------------------------------------------------
# The limit: the matmul peak, and the FLOPs of one epoch


def matmul_peak(device_name, precisions, size=2048, seconds=1.0):
    """GFLOP/s of a size x size matmul in each of `precisions` (fp32, bf16), the best of repeated timings; bf16
    emulated on a CPU without it took minutes, for a peak that meant nothing."""
    import torch
    device = torch.device(device_name)
    peaks = {}
    for name, dtype in (('fp32', torch.float32), ('bf16', torch.bfloat16)):
        if name not in precisions:
            continue
        a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
        a @ b
        sync(device)
        best, deadline = float('inf'), time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            for _ in range(4):
                a @ b
            sync(device)
            best = min(best, (time.perf_counter() - started) / 4)
        peaks[name] = 2 * size ** 3 / best / 1e9
    return peaks


def epoch_flops():
    """FLOPs of one epoch as torch's FlopCounterMode counts them: the training steps, the 24 evaluations of
    2000 images and the final 10,000-image test."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode
    from train_mnist_cnn import CNN
    model = CNN()
    images, labels = torch.rand(BATCH, 1, 28, 28), torch.randint(0, 10, (BATCH,))
    with FlopCounterMode(display=False) as step:
        F.cross_entropy(model(images)[0], labels).backward()
    with FlopCounterMode(display=False) as forward, torch.no_grad():
        model(images)
    per_image = forward.get_total_flops() / BATCH
    steps = -(-TRAIN_SIZE // BATCH)
    evaluations = steps // LOG_EVERY
    return {'train': step.get_total_flops() * steps, 'evaluations': per_image * EVAL_SIZE * evaluations,
            'final_test': per_image * TEST_SIZE}


# -----------------------------------------------------------------------------
# The parent: alternate whole processes, then the phases, then report


def timed(command):
    started = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    if out.returncode != 0:
        sys.exit(f'{command[1:3]} failed:\n{out.stderr[-2000:]}')
    return seconds, out.stdout


def cpu_seconds():
    """CPU time (user + system) of the finished children so far: on a shared machine it drifts less than wall
    time, which other tenants' load stretches."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def child(role, args):
    return [sys.executable, __file__, '--role', role, '--data-dir', args.data_dir, '--device', args.device,
            '--epochs', str(args.epochs)]


def ours_command(args, out_dir, precision='fp32', seed=1):
    return [sys.executable, SCRIPT, '--no-tsne', '--no-download', '--device', args.device, '--epochs',
            str(args.epochs), '--data-dir', args.data_dir, '--out-dir', out_dir, '--precision', precision,
            '--seed', str(seed)]


def first_step(args, out_dir, precision):
    """Seconds from starting the script's process to its first step's log line (--log-interval 1, an eval of
    50 images after it), read from its stdout; the process is then killed."""
    command = ours_command(args, out_dir, precision) + ['--log-interval', '1', '--eval-size', '50']
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        for line in process.stdout:
            if '| step ' in line:
                return time.perf_counter() - started
        sys.exit(f'{command[1:3]} logged no step:\n{process.stderr.read()[-2000:]}')
    finally:
        process.kill()
        process.communicate()


def precisions(device_name):
    """fp32, and bf16 where the script takes it: not on a CPU without native bfloat16, which it refuses."""
    import torch
    import train_mnist_cnn as tm
    try:
        tm.check_precision('bf16', torch.device(device_name))
    except tm.UsageError as e:
        print(f'benchmark: bf16 left out ({e})', flush=True)
        return ('fp32',)
    return ('fp32', 'bf16')


def measure(args):
    whole = {'tutorial': [], 'floor': [], 'ours': [], 'ours_bf16': []}
    phase = {'floor_phase': [], 'ours_phase': [], 'ours_phase_bf16': []}
    summaries = {'ours': [], 'ours_bf16': []}
    starts = {'first_step': [], 'first_step_bf16': []}
    for table in (whole, phase, summaries, starts) if 'bf16' not in args.precisions else ():
        del table[next(name for name in table if name.endswith('bf16'))]
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for name in starts:
                precision = 'bf16' if name.endswith('bf16') else 'fp32'
                seconds = first_step(args, os.path.join(scratch, f'{name}{repeat}'), precision)
                starts[name].append(seconds)
                print(f'  start-up       {name:<16} {seconds:7.2f} s (process start to the first step)', flush=True)
            for name in whole:
                if name.startswith('ours'):
                    out_dir = os.path.join(scratch, f'{name}{repeat}')
                    seconds, _ = timed(ours_command(args, out_dir, 'bf16' if name.endswith('bf16') else 'fp32'))
                    with open(os.path.join(out_dir, 'summary.json')) as f:
                        summaries[name].append(json.load(f))
                else:
                    seconds, _ = timed(child(name, args))
                whole[name].append(seconds)
                print(f'  whole process  {name:<16} {seconds:7.2f} s', flush=True)
            for name in phase:
                _, stdout = timed(child(name, args))
                phase[name].append(json.loads(stdout.strip().splitlines()[-1])['seconds'])
                print(f'  training phase {name:<16} {phase[name][-1]:7.2f} s', flush=True)
    return whole, phase, summaries, starts


def report(args, peaks, flops, whole, phase, summaries, starts):
    import torch
    median = {name: statistics.median(times) for name, times in {**whole, **phase}.items()}
    epoch_total = sum(flops.values()) * args.epochs
    train_total = flops['train'] * args.epochs

    def achieved(name):
        total = train_total if name.endswith(('phase', 'phase_bf16')) else epoch_total
        gflops = total / median[name] / 1e9
        peak = peaks['bf16' if name.endswith('bf16') else 'fp32']
        return {'seconds': round(median[name], 3), 'gflops': round(gflops, 1), 'share_of_peak': round(gflops / peak, 4)}

    result = {
        'device': args.device, 'epochs': args.epochs, 'repeats': args.repeats, 'torch': str(torch.__version__),
        'cpu_threads': torch.get_num_threads(), 'machine': os.uname().machine,
        'gpu': torch.cuda.get_device_name() if args.device.startswith('cuda') else None,
        'matmul_peak_gflops': {k: round(v, 1) for k, v in peaks.items()},
        'epoch_tflop': {k: round(v * args.epochs / 1e12, 4) for k, v in flops.items()},
        'programs': {name: achieved(name) for name in median},
        'seconds_all': {k: [round(x, 3) for x in v] for k, v in {**whole, **phase}.items()},
        'ratio_ours_to_tutorial_whole': round(median['ours'] / median['tutorial'], 3),
        'ratio_ours_to_floor_whole': round(median['ours'] / median['floor'], 3),
        'ratio_ours_to_floor_phase': round(median['ours_phase'] / median['floor_phase'], 3),
        **({'ratio_ours_bf16_to_tutorial_whole': round(median['ours_bf16'] / median['tutorial'], 3),
            'ratio_bf16_to_fp32_phase': round(median['ours_phase_bf16'] / median['ours_phase'], 3)}
           if 'ours_bf16' in median else {}),
        'ours_first_step_seconds_median': {k: round(statistics.median(v), 3) for k, v in starts.items()},
        'ours_first_step_seconds_all': {k: [round(x, 3) for x in v] for k, v in starts.items()},
        'ours_test_accuracy': {k: [round(s['test_accuracy'], 4) for s in v] for k, v in summaries.items()},
    }
    print(json.dumps(result, indent=2))
    print(f'\n{"program":<18}{"seconds":>9}{"GFLOP/s":>10}{"of peak":>9}')
    for name, figures in result['programs'].items():
        print(f'{name:<18}{figures["seconds"]:>9.2f}{figures["gflops"]:>10.1f}{figures["share_of_peak"]:>9.1%}')
    write_json(args, result)
    return result


def write_json(args, result):
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=2)


def measure_film(args):
    """Ours with the t-SNE film against ours with --no-tsne, alternated: wall and CPU seconds."""
    times, cpu = {'film': [], 'no_tsne': []}, {'film': [], 'no_tsne': []}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for name in ('no_tsne', 'film'):
                out_dir = os.path.join(scratch, f'{name}{repeat}')
                command = ours_command(args, out_dir)
                if name == 'film':
                    command.remove('--no-tsne')
                cpu_before = cpu_seconds()
                seconds, _ = timed(command)
                times[name].append(seconds)
                cpu[name].append(cpu_seconds() - cpu_before)
                print(f'  whole process  {name:<8} {seconds:7.2f} s ({cpu[name][-1]:.1f} CPU s)', flush=True)
        with open(os.path.join(out_dir, 'summary.json')) as f:
            summary = json.load(f)
        gif_bytes = os.path.getsize(os.path.join(out_dir, 'tsne.gif'))
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {'seconds_median': {k: round(v, 3) for k, v in median.items()},
              'seconds_all': {k: [round(x, 3) for x in v] for k, v in times.items()},
              'ratio_film_to_no_tsne': round(median['film'] / median['no_tsne'], 3),
              'pair_ratios': [round(f / n, 3) for f, n in zip(times['film'], times['no_tsne'])],
              'cpu_seconds_all': {k: [round(x, 2) for x in v] for k, v in cpu.items()},
              'ratio_film_to_no_tsne_cpu': round(statistics.median(cpu['film']) / statistics.median(cpu['no_tsne']), 3),
              'tsne_frames': summary['tsne_frames'], 'tsne_jump': round(summary['tsne_jump'], 4),
              'tsne_neighbour_agreement': round(summary['tsne_neighbour_agreement'], 4), 'gif_bytes': gif_bytes}
    print(json.dumps(result, indent=2))
    write_json(args, result)


def measure_seeds(args):
    """One-epoch full-test accuracy and time over seeds 1..N, fp32 and bf16 alternated: mean, sd, min, max."""
    runs = {precision: [] for precision in args.precisions}
    with tempfile.TemporaryDirectory() as scratch:
        for seed in range(1, args.seeds + 1):
            for precision in runs:
                out_dir = os.path.join(scratch, f'{precision}-{seed}')
                seconds, _ = timed(ours_command(args, out_dir, precision, seed))
                with open(os.path.join(out_dir, 'summary.json')) as f:
                    summary = json.load(f)
                runs[precision].append({'seed': seed, 'test_accuracy': summary['test_accuracy'],
                                        'train_seconds': summary['train_seconds'], 'whole_seconds': seconds})
                print(f'  seed {seed} {precision}: accuracy {summary["test_accuracy"]:.4f}, training '
                      f'{summary["train_seconds"]:.2f} s, whole {seconds:.2f} s', flush=True)

    def spread(values):
        return {'mean': round(statistics.mean(values), 4), 'sd': round(statistics.stdev(values), 4) if
                len(values) > 1 else 0.0, 'min': round(min(values), 4), 'max': round(max(values), 4)}
    result = {precision: {key: spread([r[key] for r in rows]) for key in ('test_accuracy', 'train_seconds',
                                                                          'whole_seconds')}
              for precision, rows in runs.items()}
    result['runs'] = runs
    print(json.dumps(result, indent=2))
    write_json(args, result)


def measure_predict(args):
    """The 10,000 test images written as photo-like PNGs (dark ink on grey paper, 3x, off centre, as the tests
    write them) and read back by `predict_digits.py --model RUN`: accuracy against the model's on the tensors,
    and images a second once the script has started."""
    import csv
    import torch
    import train_mnist_cnn as tm
    from conftest import photo_like
    mnist = tm.load_mnist(args.data_dir, False, tm.World(), lambda message: None)
    images, labels = mnist['test_images'], mnist['test_labels']
    model = tm.CNN()
    model.load_state_dict(tm.load_checkpoint(args.predict, '--model', model_only=True)['model'])
    with torch.inference_mode():
        on_tensors = (model.eval()(images.float() / 255)[0].argmax(1) == labels).float().mean().item()
    with tempfile.TemporaryDirectory() as scratch:
        folder = os.path.join(scratch, 'photos')
        os.mkdir(folder)
        for i, image in enumerate(images[:, 0].numpy()):
            photo_like(image).save(os.path.join(folder, f'{i:05}.png'))
        out_dir = os.path.join(scratch, 'out')
        seconds, stdout = timed([sys.executable, os.path.join(ROOT, 'predict_digits.py'), folder, '--model',
                                 args.predict, '--data-dir', args.data_dir, '--device', args.device, '--out-dir',
                                 out_dir])
        done = next(line for line in stdout.splitlines() if line.startswith('done: '))
        with open(os.path.join(out_dir, 'predictions.csv')) as f:
            predicted = [int(row['predicted']) for row in csv.DictReader(f)]
    on_photos = sum(p == l for p, l in zip(predicted, labels.tolist())) / len(predicted)
    result = {'images': len(predicted), 'accuracy_on_tensors': round(on_tensors, 4),
              'accuracy_on_photos': round(on_photos, 4), 'difference_points': round(100 * (on_photos - on_tensors), 2),
              'whole_process_seconds': round(seconds, 2), 'script_says': done}
    print(json.dumps(result, indent=2))
    write_json(args, result)


def at_least_one(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be 1 or more, got {value}')
    return value


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cpu', help='cpu or cuda (default: cpu)')
    parser.add_argument('--epochs', type=at_least_one, default=1, help='epochs per run (default: 1)')
    parser.add_argument('--repeats', type=at_least_one, default=3, help='runs of each, the median counts (default: 3)')
    parser.add_argument('--data-dir', default=os.path.join(ROOT, 'mnist'), help='MNIST root (default: ./mnist)')
    parser.add_argument('--json', metavar='FILE', help='also write the results here')
    parser.add_argument('--film', action='store_true', help='time the t-SNE film against --no-tsne instead')
    parser.add_argument('--seeds', type=at_least_one, metavar='N', help='accuracy and time over seeds 1..N instead')
    parser.add_argument('--predict', metavar='RUN',
                        help='a trained run or checkpoint: measure predict_digits.py with it instead')
    parser.add_argument('--role', choices=ROLES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        return run_role(args.role, args.data_dir, args.device, args.epochs)
    import train_mnist_cnn as tm
    tm.resolve_device(args.device, tm.World())  # an absent one: the script's one line
    if args.film:
        print(f'benchmark: {args.repeats} x (--no-tsne, film) whole processes on {args.device}', flush=True)
        return measure_film(args)
    if args.predict:
        return measure_predict(args)
    args.precisions = precisions(args.device)
    if args.seeds:
        print(f'benchmark: seeds 1..{args.seeds}, {" and ".join(args.precisions)}, {args.epochs} epoch(s) on '
              f'{args.device}', flush=True)
        return measure_seeds(args)
    peaks, flops = matmul_peak(args.device, args.precisions), epoch_flops()
    ours = ', ours, ours bf16' if 'bf16' in args.precisions else ', ours'
    peak = ', '.join(f'{gflops:.0f} GFLOP/s {name}' for name, gflops in peaks.items())
    print(f'benchmark: matmul peak {peak}; one epoch {sum(flops.values()) / 1e12:.2f} TFLOP; {args.repeats} x '
          f'(tutorial, floor{ours}) whole processes, then training phases; {args.epochs} epoch(s) on {args.device}',
          flush=True)
    report(args, peaks, flops, *measure(args))


def run_as_script():
    """main(), where a stop (Ctrl-C, SIGTERM) or the trainer's refusal is one line and leaves no folder behind."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # (its temporary folders go too)
    try:
        main()
    except KeyboardInterrupt:
        print('benchmark: interrupted', file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        tm = sys.modules.get('train_mnist_cnn')
        if tm is None or not isinstance(e, (tm.RunError, tm.UsageError)):
            raise
        sys.exit(f'benchmark: {e}')


if __name__ == '__main__':
    run_as_script()
