"""What the tests and the bench scripts share, so that each helper exists once.

- `paths`: where the repository, the installed models and the labelled photos of ../shared are.
- `images`: base64 as the host sends images, a faceless photo, a pixel bomb.
- `servers`: the backend in this process (`InProcessServer`), `backend.py` as a subprocess that
  is healthy when started (`BackendProcess`), free ports, channels sized like the server's.
- `procfs`: a process's RSS, peak RSS and thread count from /proc, peak reset, RSS sampling.
- `spoof_samples`: upstream Silent-Face's sample photos and its detector's face boxes in them.

`bench/` imports this package and never `tests/`; `tests/support.py` re-exports the paths and
image helpers and adds the test-only rules (skip on missing weights, fail under CI).
"""
