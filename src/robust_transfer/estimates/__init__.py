"""What the library reports about an encoder and its heads: the Jacobian profile behind
the expected robust accuracy, the per-sample arrays of one evaluation, their summary
records, and the entry point :func:`measure` with its robustness curves."""
