"""Resumable `checkpoint_dir`: the per-epoch state of each phase of a run, written atomically.

Layout of a checkpoint directory (format version 2):

```
PATH/manifest.json          the phases in the order they started, each with the fingerprint and
                            plan it was started with, and its last two committed generations:
                            the file name, size and SHA-256 of each state (and best) file. The
                            manifest carries a SHA-256 of its own content.
PATH/.lock                  held with `fcntl.flock` by the one process writing the directory;
                            it holds that process's id (for the error message only)
PATH/<phase>/<n>.state.npz  a finished epoch of that phase: every model variable (weights and
                            random-seed state), every optimizer variable and a JSON record (next
                            epoch, joined history, finished, diverged)
PATH/<phase>/<n>.best.npz   the model variables of the best epoch so far (`restore_best` only)
```

Every file is written to a temporary file in the same directory, flushed to disk (`fsync`) and
renamed into place, and the directory is flushed too. An epoch is committed when the manifest
naming its files is renamed into place, so a process killed (or a disk filled) at any instant
leaves the previous commit complete; files a failed commit wrote are removed.

Two generations are kept, as Keras' `BackupAndRestore(double_checkpoint=True)` does: a state file
whose size or checksum no longer matches the manifest (a crash of the machine, bit rot) is never
loaded; the run resumes from the previous generation with a warning, and when no generation is
intact `CheckpointError` names the damaged files. Directories written in format version 1
(`<phase>/state.npz` and `best.npz`, no checksums) still resume; their next commit rewrites the
manifest in version 2.

Keras' `BackupAndRestore` does not fit this job: it writes with `save_weights` in place (a kill
mid-write loses the backup), deletes its directory when training ends, knows nothing of phases or
history, and resumes through the private `model._initial_epoch`, which it leaves set. transferkit
resumes through `fit(initial_epoch=...)` instead.

A directory belongs to one run: a phase can only be resumed by the same model and plan, compared
by fingerprint (architecture, trainable flags, frozen weights, plan), never by the auto-generated
layer names, which change between rebuilds in one process. It has one writer at a time: a second
process (or thread) opening it while the first holds its lock gets `CheckpointError` at once, and
the lock dies with its holder (a SIGKILLed process leaves nothing to clean up).

The modules, bottom first (each imports only modules above it in this list):

- `records`: the JSON inside the directory: `json_default` (how values are encoded) and
  `is_int` (what counts as a count when reading it back).
- `lock`: the one-writer `flock` on `.lock` (`Lock`).
- `fingerprint`: `fingerprint`, what makes a phase belong to a model and plan, and
  `check_fingerprint`, which refuses another's.
- `state`: `PhaseState` and the per-epoch `.npz` files that hold it (writing their arrays,
  reading and checking them back; `Damaged` for a file that must not be loaded).
- `manifest`: reading (format 1 or 2) and writing (format 2) `manifest.json`, its checksums
  and the file names it may hold.
- `store`: `CheckpointStore`, which opens (checks and locks) a phase, loads its newest intact
  generation and commits new ones.
"""
