"""Studies: a configuration of encoders, tasks, adaptations and threats, run into a
resumable per-sample store, aggregated into records and reported."""
