"""Trainers. Shared pieces live one level up: ``sdjax.sharding`` (mesh, rules, global batches),
``sdjax.train_state`` (TrainState, EMA, optimizer, sharded init), ``sdjax.checkpoints``
(training checkpoints, exports, loading) and ``sdjax.metrics`` (TensorBoard/JSONL/console)."""
