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
