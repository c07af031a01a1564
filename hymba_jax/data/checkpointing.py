"""Saving and restoring the data iterator's position with Orbax, through Grain's own handler.

Grain ships an Orbax `CheckpointHandler` that writes each host's iterator state as
`process_<i>-of-<n>.json` in the item's directory; its args classes are registered with Orbax, so a
`CheckpointManager` needs no handler registry. Save it next to the train state:

    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state), data=iterator_save_args(data_iterator)))
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=iterator_restore_args(data_iterator)))

Restoring sets the state of `data_iterator` in place (and returns it as `restored.data`); the next
batch is the one that followed the saved step. The iterator must come from the same pipeline
settings (source, seed, batch size, seq_len, host count).
"""

from __future__ import annotations

import grain
import orbax.checkpoint as ocp


def iterator_save_args(iterator: grain.DatasetIterator) -> ocp.args.CheckpointArgs:
    """Orbax args that save `iterator`'s position (this host's file of the data item)."""
    return grain.checkpoint.CheckpointSave(iterator)


def iterator_restore_args(iterator: grain.DatasetIterator) -> ocp.args.CheckpointArgs:
    """Orbax args that restore a saved position into `iterator` (in place)."""
    return grain.checkpoint.CheckpointRestore(iterator)
