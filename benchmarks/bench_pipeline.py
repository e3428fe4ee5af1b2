"""Pipeline throughput beside the model's own ceiling and a tf.data baseline, per seed model.

For each seed model (random weights, real architecture, TF Hub format) it measures, in one
invocation: the model-only ceiling (the better of one process with TensorFlow's default
threads and one single-threaded process per core, summed; best batch size), decode-only
images/s, run_pipeline.py end to end with its default local settings, and the tf.data
baseline. End-to-end rates exclude start-up: each job runs over the image set and over
the set repeated, and the rate is the extra images over the extra time. Prints a table
and JSON.

  python benchmarks/bench_pipeline.py                 # caltech101-25 (or generated photos)
  python benchmarks/bench_pipeline.py --large         # generated 3000x2000 JPEGs
"""

import argparse
import json
import os
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

CALTECH = os.path.join(os.path.dirname(PROJECT), 'shared', 'datasets', 'caltech101-25')
SEED_SIZES = {'mobilenet_v1_050_160': 160, 'mobilenet_v2_130_224': 224,
              'mobilenet_v3_small_100_224': 224}


class PeakMemory:
  """Peak resident memory of a process and all its descendants, summed, by polling /proc."""

  def __init__(self, pid, interval=0.1):
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

  def _rss(self, pid):
    try:
      with open('/proc/%d/status' % pid) as f:
        for line in f:
          if line.startswith('VmRSS:'):
            return int(line.split()[1]) * 1024
    except OSError:
      pass
    return 0

  def _poll(self):
    while not self._stop.is_set():
      self.peak_bytes = max(self.peak_bytes, sum(self._rss(p) for p in self._tree()))
      self._stop.wait(self._interval)

  def stop(self):
    self._stop.set()
    self._thread.join()
    return self.peak_bytes


def timed(command):
  """Runs a command; returns (seconds, peak resident bytes of its process tree)."""
  started = time.perf_counter()
  process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             cwd=PROJECT)
  memory = PeakMemory(process.pid)
  _, stderr = process.communicate()
  peak = memory.stop()
  if process.returncode != 0:
    raise RuntimeError('%s failed:\n%s' % (' '.join(command), stderr.decode()[-3000:]))
  return time.perf_counter() - started, peak


def link_copies(files, directory, copies):
  """`copies` copies of the image set as symlinks, under distinct names (distinct keys)."""
  for copy in range(copies):
    for index, path in enumerate(files):
      target = os.path.join(directory, 'copy%d' % copy, '%06d%s' % (
          index, os.path.splitext(path)[1]))
      os.makedirs(os.path.dirname(target), exist_ok=True)
      os.symlink(path, target)
  return os.path.join(directory, 'copy*', '*')


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
        f.write(imagegen.encode(imagegen.photo(seed, width, height), 'JPEG', quality=90))
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
    start_at = time.time() + 15  # time for every process to load before measuring
    processes = [subprocess.Popen(base + ['--threads', '1', '--start_at', str(start_at)],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  text=True) for _ in range(os.cpu_count())]
    per_core = sum(json.loads(p.communicate()[0].strip().splitlines()[-1])
                   ['images_per_second'] for p in processes)
    results[batch_size] = {'one_process_default_threads': one['images_per_second'],
                           'one_process_per_core': per_core}
  best_batch = max(results, key=lambda b: max(results[b].values()))
  return max(results[best_batch].values()), best_batch, results


def decode_rate(files, size):
  from transforms.decode import decode_image  # pylint: disable=import-outside-toplevel
  blobs = []
  for path in files:
    with open(path, 'rb') as f:
      blobs.append(f.read())
  started = time.perf_counter()
  for blob in blobs:
    decode_image(blob, [(size, size)])
  return len(blobs) / (time.perf_counter() - started)


def marginal_rate(make_command, pattern_once, pattern_twice, count, workdir, repeats):
  """Images/s excluding start-up: (2N - N) images over (t(2N) - t(N)); median of repeats.
  Also returns the peak memory of the larger run."""
  rates, peaks = [], []
  workdir = tempfile.mkdtemp(dir=workdir)
  for repeat in range(repeats):
    t_once, _ = timed(make_command(pattern_once, os.path.join(workdir, 'o1-%d' % repeat)))
    t_twice, peak = timed(make_command(pattern_twice, os.path.join(workdir, 'o2-%d' % repeat)))
    rates.append(count / max(t_twice - t_once, 1e-6))
    peaks.append(peak)
  return statistics.median(rates), max(peaks), rates


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--large', action='store_true',
                      help='generated camera-sized 3000x2000 JPEGs instead of caltech101-25')
  parser.add_argument('--models', nargs='*', default=sorted(SEED_SIZES))
  parser.add_argument('--limit', type=int, default=None, help='use only the first N images')
  parser.add_argument('--repeats', type=int, default=2, help='runs per measurement (median)')
  parser.add_argument('--ceiling_seconds', type=float, default=10.0)
  parser.add_argument('--batch_sizes', type=int, nargs='*', default=[32, 64, 128])
  parser.add_argument('--pipeline_args', default='',
                      help='extra flags for run_pipeline.py (default: its own defaults)')
  parser.add_argument('--skip_baseline', action='store_true')
  parser.add_argument('--scaling', action='store_true',
                      help='also run the pipeline over the set repeated four times and '
                           'report whether the time per image stays flat')
  parser.add_argument('--json', help='also write the JSON figures to this file')
  parser.add_argument('--keep', action='store_true', help='keep the work folder')
  args = parser.parse_args()
  workdir = tempfile.mkdtemp(prefix='bench_pipeline_')
  try:
    run(args, workdir)
  finally:
    if not args.keep:
      shutil.rmtree(workdir, ignore_errors=True)


def run(args, workdir):

  import model_factory  # pylint: disable=import-outside-toplevel
  files, dataset = dataset_files(args, workdir)
  once = link_copies(files, os.path.join(workdir, 'once'), 1)
  twice = link_copies(files, os.path.join(workdir, 'twice'), 2)
  four = link_copies(files, os.path.join(workdir, 'four'), 4) if args.scaling else None
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

    pipeline, peak, pipeline_runs = marginal_rate(
        pipeline_command, once, twice, len(files), workdir, args.repeats)
    figures = {'ceiling': best, 'ceiling_batch_size': best_batch, 'ceiling_by_batch': by_batch,
               'decode_only': decode_rate(files, size), 'pipeline': pipeline,
               'pipeline_runs': pipeline_runs, 'pipeline_peak_memory_gb': peak / 2**30,
               'pipeline_over_ceiling': pipeline / best}
    if args.scaling:
      # Time per image from N to 4N images, start-up excluded as above: flat means the
      # job holds nothing per image that grows with the run.
      four_rate, four_peak, _ = marginal_rate(
          pipeline_command, once, four, 3 * len(files), workdir, 1)
      figures.update(pipeline_4x=four_rate, pipeline_4x_peak_memory_gb=four_peak / 2**30,
                     time_per_image_4x_over_2x=pipeline / four_rate)
    if not args.skip_baseline:
      baseline, baseline_peak, baseline_runs = marginal_rate(
          baseline_command, once, twice, len(files), workdir, args.repeats)
      figures.update(baseline=baseline, baseline_runs=baseline_runs,
                     baseline_peak_memory_gb=baseline_peak / 2**30,
                     pipeline_over_baseline=pipeline / baseline)
    report['models'][name] = figures
    print(json.dumps({name: figures}), file=sys.stderr)

  print('%s, %d images, %d cores; images/s (end to end excludes start-up)'
        % (dataset, len(files), os.cpu_count()))
  print('%-28s %8s %8s %9s %9s %8s %8s %7s' % ('model', 'ceiling', 'decode', 'pipeline',
                                              'baseline', 'pipe/ceil', 'pipe/base', 'peak GB'))
  for name, f in report['models'].items():
    print('%-28s %8.1f %8.1f %9.1f %9s %8.2f %8s %7.2f' % (
        name, f['ceiling'], f['decode_only'], f['pipeline'],
        '%.1f' % f['baseline'] if 'baseline' in f else '-', f['pipeline_over_ceiling'],
        '%.2f' % f['pipeline_over_baseline'] if 'baseline' in f else '-',
        f['pipeline_peak_memory_gb']))
  print(json.dumps(report, indent=2))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(report, f, indent=2)


if __name__ == '__main__':
  main()
