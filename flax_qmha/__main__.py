"""``python -m flax_qmha``: the same command line as the ``flax-qmha`` script."""

from flax_qmha._cli import main

raise SystemExit(main())
