"""Routing FailureRecords out of a stage's main output into its 'failures' side output."""

import apache_beam as beam

from schemas.records import FAILURES_TAG, FailureRecord


def route_failures(records):
  """Yields each record, with FailureRecords tagged for the stage's failure output."""
  for record in records:
    if isinstance(record, FailureRecord):
      yield beam.pvalue.TaggedOutput(FAILURES_TAG, record)
    else:
      yield record


# Examples kept per failure reason (the smallest keys, so reruns show the same ones).
MAX_EXAMPLES_PER_REASON = 3


def _add_examples(examples, more):
  return sorted(set(examples) | set(more))[:MAX_EXAMPLES_PER_REASON]


class FailureReasons(beam.CombineFn):
  """FailureRecords -> one entry per reason (stage, error type, model): its count and
  its first examples, the most frequent reason first. Manifest, summary and report
  show these entries."""

  def create_accumulator(self):
    return {}

  def add_input(self, accumulator, record: FailureRecord):
    reason = (record.stage, record.error, record.model)
    count, examples = accumulator.get(reason, (0, []))
    accumulator[reason] = (count + 1, _add_examples(
        examples, [(record.key, record.uri, record.message)]))
    return accumulator

  def merge_accumulators(self, accumulators):
    merged = {}
    for accumulator in accumulators:
      for reason, (count, examples) in accumulator.items():
        total, kept = merged.get(reason, (0, []))
        merged[reason] = (total + count, _add_examples(kept, examples))
    return merged

  def extract_output(self, accumulator):
    entries = [{'stage': stage, 'error': error, 'model': model, 'count': count,
                'examples': [{'key': key, 'uri': uri, 'message': message}
                             for key, uri, message in examples]}
               for (stage, error, model), (count, examples) in accumulator.items()]
    return sorted(entries, key=lambda e: (-e['count'], e['stage'], e['error'],
                                          e['model'] or ''))
