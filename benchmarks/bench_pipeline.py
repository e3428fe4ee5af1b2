"""Pipeline throughput beside the model's own ceiling and a tf.data baseline, per seed model.

For each seed model (random weights, real architecture, TF Hub format) it measures, in one
invocation: the model-only ceiling (the better of one process with TensorFlow's default
threads and one single-threaded process per core, summed; best batch size), decode-only
images/s, the loop bound (the same per-core processes decoding the images with the
pipeline's decode before each model call: no Beam, reading or writing), run_pipeline.py
end to end with its default local settings, and the tf.data baseline. End-to-end rates
exclude start-up: each job runs over the image set and over the set repeated four
times, and the rate is the extra images over the extra time. With --scaling it also
judges whether the time per image stays flat as the run grows. Prints a table and JSON.

  python benchmarks/bench_pipeline.py                 # caltech101-25 (or generated photos)
  python benchmarks/bench_pipeline.py --large         # generated 3000x2000 JPEGs
  python benchmarks/bench_pipeline.py --scaling_copies 1 4 16   # flatness on larger sets
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT = os.path.dirname(HERE)
sys.path.insert(0, PROJECT)
sys.path.insert(0, os.path.join(PROJECT, 'tests'))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from benchmarks.model_ceiling import read_encoded  # pylint: disable=wrong-import-position

CALTECH = os.path.join(os.path.dirname(PROJECT), 'shared', 'datasets', 'caltech101-25')
SEED_SIZES = {'mobilenet_v1_050_160': 160, 'mobilenet_v2_130_224': 224,
              'mobilenet_v3_small_100_224': 224}


class PeakMemory:
  """Peak memory of a process and all its descendants, by polling /proc: the sum of their
  proportional set sizes (PSS), so that pages the processes share (TensorFlow's and
  Beam's libraries, mapped by every worker) count once, as the machine holds them."""

  def __init__(self, pid, interval=0.2):
    self.peak_bytes = 0
    self._pid, self._interval = pid, interval
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._poll, daemon=True)
    self._thread.start()

  def _tree(self):
    children = {}
    for entry in os.listdir('/proc'):
      if entry.isdigit():
        try:
          with open('/proc/%s/stat' % entry) as f:
            parent = int(f.read().rsplit(')', 1)[1].split()[1])
          children.setdefault(parent, []).append(int(entry))
        except (OSError, IndexError, ValueError):
          pass
    pids, todo = [], [self._pid]
    while todo:
      pid = todo.pop()
      pids.append(pid)
      todo.extend(children.get(pid, []))
    return pids

  def _pss(self, pid):
    try:
      with open('/proc/%d/smaps_rollup' % pid) as f:
        for line in f:
          if line.startswith('Pss:'):
            return int(line.split()[1]) * 1024
    except OSError:
      pass
    return 0

  def _poll(self):
    while not self._stop.is_set():
      self.peak_bytes = max(self.peak_bytes, sum(self._pss(p) for p in self._tree()))
      self._stop.wait(self._interval)

  def stop(self):
    self._stop.set()
    self._thread.join()
    return self.peak_bytes


def children_cpu_seconds():
  """User + system CPU seconds of every finished child process and their waited-for
  descendants (the pipeline's worker processes included)."""
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def timed(command, measure_memory=False):
  """Runs a command; returns (seconds, peak memory of its process tree in bytes, or None
  when not measured, CPU seconds of its process tree). Reading the PSS of a TensorFlow
  process costs the kernel tens of milliseconds, so a run whose memory is measured is
  not timed, and the reverse."""
  # Every run checks its model as a first launch does: with remembered checks, the first
  # run of a model would pay a probe (about 3 s) that the later ones skip, and the
  # marginal rate of its pair would be inflated (v1: 1574 images/s against 841-917).
  probe_cache = tempfile.mkdtemp(prefix='bench-probe-cache-')
  environment = dict(os.environ, BEAM_IMAGE_EMBEDDINGS_CACHE=probe_cache)
  cpu_before = children_cpu_seconds()
  started = time.perf_counter()
  process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             cwd=PROJECT, env=environment)
  memory = PeakMemory(process.pid) if measure_memory else None
  _, stderr = process.communicate()
  peak = memory.stop() if memory else None
  shutil.rmtree(probe_cache, ignore_errors=True)
  if process.returncode != 0:
    raise RuntimeError('%s failed:\n%s' % (' '.join(command), stderr.decode()[-3000:]))
  return time.perf_counter() - started, peak, children_cpu_seconds() - cpu_before


def link_copies(files, directory, copies):
  """`copies` copies of the image set as symlinks, under distinct names (distinct keys)."""
  for copy in range(copies):
    for index, path in enumerate(files):
      target = os.path.join(directory, 'copy%d' % copy, '%06d%s' % (
          index, os.path.splitext(path)[1]))
      os.makedirs(os.path.dirname(target), exist_ok=True)
      os.symlink(path, target)
  return os.path.join(directory, 'copy*', '*')


def camera_like(image, seed, grain_sigma=10):
  """A generated photo with sensor-like grain: smooth shapes alone make a 3000x2000 JPEG
  of 0.2 MB that decodes several times faster than a camera's 2-4 MB."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  grain = np.random.default_rng(seed).normal(0, grain_sigma, (image.height, image.width, 3))
  return Image.fromarray(np.clip(np.asarray(image) + grain, 0, 255).astype(np.uint8))


def dataset_files(args, workdir):
  """The benchmark's images: caltech101-25, generated photos, or generated large JPEGs."""
  import imagegen  # pylint: disable=import-outside-toplevel
  if args.large or not os.path.isdir(CALTECH):
    width, height = (3000, 2000) if args.large else (400, 300)
    count = args.limit or (300 if args.large else 1000)
    directory = os.path.join(workdir, 'generated')
    os.makedirs(directory)
    files = []
    for seed in range(count):
      path = os.path.join(directory, '%05d.jpg' % seed)
      with open(path, 'wb') as f:
        image = imagegen.photo(seed, width, height)
        f.write(imagegen.encode(camera_like(image, seed) if args.large else image, 'JPEG',
                                quality=90))
      files.append(path)
    return files, 'generated %dx%d JPEGs' % (width, height)
  files = sorted(os.path.join(root, name) for root, _, names in os.walk(CALTECH)
                 for name in names)
  return files[:args.limit] if args.limit else files, 'caltech101-25'


def ceiling(name, handle, seconds, batch_sizes):
  """Model-only images/s: best of one default-threaded process and one single-threaded
  process per core (summed), at the best batch size."""
  script = os.path.join(HERE, 'model_ceiling.py')
  results = {}
  for batch_size in batch_sizes:
    base = [sys.executable, script, '--model', '%s=%s' % (name, handle),
            '--batch_size', str(batch_size), '--seconds', str(seconds)]
    one = json.loads(subprocess.run(base, capture_output=True, check=True,
                                    text=True).stdout.strip().splitlines()[-1])
    results[batch_size] = {'one_process_default_threads': one['images_per_second'],
                           'one_process_per_core': per_core_rate(base)}
  best_batch = max(results, key=lambda b: max(results[b].values()))
  return max(results[best_batch].values()), best_batch, results


def per_core_rate(command, share_images=False):
  """Images/s summed over one single-threaded model_ceiling.py process per core, measured
  together; with share_images, each process decodes its share of them (--part I/N)."""
  start_at = time.time() + 15  # time for every process to load before measuring
  cores = os.cpu_count()
  processes = [subprocess.Popen(
      command + ['--threads', '1', '--start_at', str(start_at)]
      + (['--part', '%d/%d' % (core, cores)] if share_images else []),
      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for core in range(cores)]
  return sum(json.loads(p.communicate()[0].strip().splitlines()[-1])['images_per_second']
             for p in processes)


def loop_bound(name, handle, files, seconds, workdir):
  """Images/s of a plain loop without Beam: per core, one process decoding its share of
  the set (held in memory) with the pipeline's decode and calling the model on batches of
  the pipeline's default size. What the pipeline could reach with no overhead at all."""
  from transforms.embed import DEFAULT_BATCH_SIZE  # pylint: disable=import-outside-toplevel
  listing = os.path.join(workdir, 'decode_list.txt')
  with open(listing, 'w', encoding='utf-8') as f:
    f.write('\n'.join(files))
  return per_core_rate(
      [sys.executable, os.path.join(HERE, 'model_ceiling.py'), '--model',
       '%s=%s' % (name, handle), '--batch_size', str(DEFAULT_BATCH_SIZE),
       '--seconds', str(seconds), '--decode_list', listing], share_images=True)


def decode_rate(files, size):
  from transforms.decode import decode_image  # pylint: disable=import-outside-toplevel
  blobs = read_encoded(files)
  started = time.perf_counter()
  for blob in blobs:
    decode_image(blob, [(size, size)])
  return len(blobs) / (time.perf_counter() - started)


def marginal_rates(make_command, patterns, count, workdir, repeats):
  """Images/s excluding start-up, from runs over the set repeated 1, 4 and any other
  number of times ({copies: pattern}): the extra images over the extra time, 1x -> 4x
  (the headline figure: 3N images of work against one start-up's noise), and between
  every two consecutive sizes given ('1x_to_2x', '2x_to_4x', '4x_to_16x': time per image
  flat when these agree). Medians over `repeats`, and 'best_1x_to_4x' from the fastest
  run of each size: one slow 1x run (the tf.data baseline sometimes runs at half speed)
  inflates its repeat's rate. Also the peak memory at 4x, in one more run (not timed:
  polling the memory of six processes took 17% of a core, 8% of this machine), and the
  same marginal figures in CPU milliseconds per image (every process of the job, summed),
  which vary far less than wall time on a shared machine (about 1% against 5-10%)."""
  seconds = {copies: [] for copies in patterns}
  cpu_seconds = {copies: [] for copies in patterns}
  workdir = tempfile.mkdtemp(dir=workdir)
  for repeat in range(repeats):
    for copies, pattern in sorted(patterns.items()):
      elapsed, _, cpu = timed(make_command(pattern, os.path.join(
          workdir, 'x%d-%d' % (copies, repeat))))
      seconds[copies].append(elapsed)
      cpu_seconds[copies].append(cpu)
  _, peak, _ = timed(make_command(patterns[4], os.path.join(workdir, 'x4-memory')),
                     measure_memory=True)

  def extra_rate(low, high, t_low, t_high):
    return (high - low) * count / max(t_high - t_low, 1e-6)

  def rate(low, high):
    return statistics.median(extra_rate(low, high, t_low, t_high)
                             for t_low, t_high in zip(seconds[low], seconds[high]))

  def cpu_ms_per_image(low, high):
    return statistics.median(1000 * (c_high - c_low) / ((high - low) * count)
                             for c_low, c_high in zip(cpu_seconds[low], cpu_seconds[high]))

  rates = {'1x_to_4x': rate(1, 4),
           'best_1x_to_4x': extra_rate(1, 4, min(seconds[1]), min(seconds[4]))}
  cpu_ms = {'1x_to_4x': cpu_ms_per_image(1, 4)}
  sizes = sorted(seconds)
  for low, high in zip(sizes, sizes[1:]):
    rates[step_name(low, high)] = rate(low, high)
    cpu_ms[step_name(low, high)] = cpu_ms_per_image(low, high)
  return rates, peak, seconds, cpu_ms


def step_name(low, high):
  return '%dx_to_%dx' % (low, high)


def flatness_steps(copies):
  """The two steps flatness compares: the last of `copies` and the one before."""
  return step_name(*copies[-2:]), step_name(*copies[-3:-1])


def flatness_label(copies):
  return '%s over %s' % flatness_steps(copies)


def flatness(rates, cpu_ms, copies):
  """Time per image over the last step of `copies` (say 4x -> 16x) divided by the one
  before (1x -> 4x), in wall time and in CPU time: 1.0 is flat, above it the job slows
  down as the run grows."""
  later, earlier = flatness_steps(copies)
  return {'steps': flatness_label(copies),
          'wall': rates[earlier] / rates[later],
          'cpu': cpu_ms[later] / cpu_ms[earlier]}


def scaling_copies(sizes):
  """--scaling_copies: three or more sizes, from 1, with 4 among them (the headline)."""
  copies = sorted(set(sizes))
  if len(copies) < 3 or copies[0] != 1 or 4 not in copies:
    raise argparse.ArgumentTypeError(
        'needs three or more sizes starting at 1 and including 4, like 1 2 4 or 1 4 16')
  return tuple(copies)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--large', action='store_true',
                      help='generated camera-sized 3000x2000 JPEGs instead of caltech101-25')
  parser.add_argument('--models', nargs='*', default=sorted(SEED_SIZES),
                      choices=sorted(SEED_SIZES), metavar='MODEL',
                      help='seed models to measure (default: all): %(choices)s')
  parser.add_argument('--limit', type=int, default=None, help='use only the first N images')
  parser.add_argument('--repeats', type=int, default=2, help='runs per measurement (median)')
  parser.add_argument('--ceiling_seconds', type=float, default=10.0)
  parser.add_argument('--batch_sizes', type=int, nargs='*', default=[8, 16, 32, 64])
  parser.add_argument('--pipeline_args', default='',
                      help='extra flags for run_pipeline.py (default: its own defaults)')
  parser.add_argument('--skip_baseline', action='store_true')
  parser.add_argument('--scaling', action='store_true',
                      help='also run the pipeline over the set repeated twice and report '
                           'whether the time per image stays flat from 2x to 4x '
                           '(--scaling_copies 1 2 4)')
  parser.add_argument('--scaling_copies', nargs='+', type=int, metavar='N',
                      help='judge flatness on these sizes instead (implies --scaling): '
                           'the time per image over the last step against the one '
                           'before; 1 4 16 compares 4x -> 16x with 1x -> 4x, larger sets '
                           'where start-up jitter weighs less')
  parser.add_argument('--json', help='also write the JSON figures to this file')
  parser.add_argument('--keep', action='store_true', help='keep the work folder')
  args = parser.parse_args()
  try:
    args.scaling_copies = (scaling_copies(args.scaling_copies) if args.scaling_copies
                           else (1, 2, 4) if args.scaling else (1, 4))
  except argparse.ArgumentTypeError as e:
    parser.error('--scaling_copies %s' % e)
  workdir = tempfile.mkdtemp(prefix='bench_pipeline_')
  try:
    run(args, workdir)
  finally:
    if not args.keep:
      shutil.rmtree(workdir, ignore_errors=True)


def run(args, workdir):

  import model_factory  # pylint: disable=import-outside-toplevel
  files, dataset = dataset_files(args, workdir)
  copies = args.scaling_copies
  patterns = {n: link_copies(files, os.path.join(workdir, 'x%d' % n), n) for n in copies}
  handles = model_factory.build_seed_models(os.path.join(workdir, 'models'))
  report = {'dataset': dataset, 'images': len(files), 'cores': os.cpu_count(),
            'models': {}}
  for name in args.models:
    size = SEED_SIZES[name]
    handle = handles[name]
    best, best_batch, by_batch = ceiling(name, handle, args.ceiling_seconds, args.batch_sizes)

    def pipeline_command(pattern, out, name=name, handle=handle):
      return ([sys.executable, os.path.join(PROJECT, 'run_pipeline.py'), '--input', pattern,
               '--output', out, '--model', '%s=%s' % (name, handle)]
              + args.pipeline_args.split())

    def baseline_command(pattern, out, handle=handle, size=size):
      return [sys.executable, os.path.join(HERE, 'tfdata_baseline.py'), '--input', pattern,
              '--model', handle, '--size', str(size), '--output', out]

    rates, peak, seconds, cpu_ms = marginal_rates(pipeline_command, patterns, len(files),
                                                  workdir, args.repeats)
    pipeline = rates['1x_to_4x']
    loop = loop_bound(name, handle, files, args.ceiling_seconds, workdir)
    figures = {'ceiling': best, 'ceiling_batch_size': best_batch, 'ceiling_by_batch': by_batch,
               'decode_only': decode_rate(files, size), 'loop_bound': loop,
               'loop_over_ceiling': loop / best, 'pipeline_over_loop': pipeline / loop,
               'pipeline': pipeline,
               'pipeline_rates': rates, 'pipeline_seconds': seconds,
               'pipeline_peak_memory_gb': peak / 2**30,
               'pipeline_over_ceiling': pipeline / best,
               'pipeline_best_runs': rates['best_1x_to_4x'],
               'pipeline_cpu_ms_per_image': cpu_ms}
    if len(copies) > 2:
      # Flat time per image: the job holds nothing per image that grows with the run.
      figures['flatness'] = flatness(rates, cpu_ms, copies)
    if not args.skip_baseline:
      baseline_rates, baseline_peak, baseline_seconds, baseline_cpu_ms = marginal_rates(
          baseline_command, {1: patterns[1], 4: patterns[4]}, len(files), workdir,
          args.repeats)
      baseline = baseline_rates['1x_to_4x']
      figures.update(baseline=baseline, baseline_seconds=baseline_seconds,
                     baseline_cpu_ms_per_image=baseline_cpu_ms,
                     baseline_peak_memory_gb=baseline_peak / 2**30,
                     pipeline_over_baseline=pipeline / baseline,
                     baseline_best_runs=baseline_rates['best_1x_to_4x'],
                     pipeline_over_baseline_best_runs=(
                         rates['best_1x_to_4x'] / baseline_rates['best_1x_to_4x']))
    report['models'][name] = figures
    print(json.dumps({name: figures}), file=sys.stderr)

  print('%s, %d images, %d cores; images/s (end to end excludes start-up)'
        % (dataset, len(files), os.cpu_count()))
  print('%-28s %8s %8s %8s %9s %9s %9s %9s %9s %9s %9s %11s %9s %11s %9s' % (
      'model', 'ceiling', 'decode', 'loop', 'loop/ceil', 'pipeline', 'pipe/loop', 'baseline',
      'pipe/ceil', 'pipe/base', 'p/b best', 'peak GB p/b', 'flat wall', 'cpu ms p/b',
      'flat cpu'))
  for name, f in report['models'].items():
    print('%-28s %8.1f %8.1f %8.1f %9.2f %9.1f %9.2f %9s %9.2f %9s %9s %11s %9s %11s %9s' % (
        name, f['ceiling'], f['decode_only'], f['loop_bound'], f['loop_over_ceiling'],
        f['pipeline'], f['pipeline_over_loop'],
        '%.1f' % f['baseline'] if 'baseline' in f else '-', f['pipeline_over_ceiling'],
        '%.2f' % f['pipeline_over_baseline'] if 'baseline' in f else '-',
        '%.2f' % f['pipeline_over_baseline_best_runs'] if 'baseline' in f else '-',
        '%.1f/%s' % (f['pipeline_peak_memory_gb'], '%.1f' % f['baseline_peak_memory_gb']
                     if 'baseline' in f else '-'),
        '%.2f' % f['flatness']['wall'] if 'flatness' in f else '-',
        '%.2f/%s' % (f['pipeline_cpu_ms_per_image']['1x_to_4x'],
                     '%.2f' % f['baseline_cpu_ms_per_image']['1x_to_4x']
                     if 'baseline' in f else '-'),
        '%.2f' % f['flatness']['cpu'] if 'flatness' in f else '-'))
  if len(copies) > 2:
    print('flat wall / flat cpu: time per image %s (1.0 is flat)'
          % flatness_label(copies))
  print_report(report, args.json, indent=2)


def print_report(report, path=None, indent=None):
  """Prints a benchmark's JSON figures, and writes them to path when one is given."""
  print(json.dumps(report, indent=indent))
  if path:
    with open(path, 'w', encoding='utf-8') as f:
      json.dump(report, f, indent=2)


if __name__ == '__main__':
  main()
