"""One training run: its pure plan (``plan``), the loop (``loop``) and what it uses (``losses``,
``ema``, ``optimizers``), its processes (``dist``, ``worker``), publishing the files (``publish``)
and the loss curve (``lossplot``). The train stage that runs it is ``stages/train.py``."""
