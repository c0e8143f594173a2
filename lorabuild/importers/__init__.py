"""``lorabuild import-kohya``: each reader turns a kohya, lora-scripts, kohya_ss, ai-toolkit or
OneTrainer setup into kohya's option names (``read``), which ``options`` and ``datasets`` map
onto a project and ``convert`` assembles; ``write`` resolves paths, writes and validates it."""
