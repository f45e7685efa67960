"""The theory: threat models, the loss bounds of Result 1, the robust classification
criterion of Result 2 and the first-order margin arithmetic. Torch only, no I/O."""
