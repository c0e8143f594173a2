"""The adapter: kohya's LoRA network (``network``), LyCORIS' types (``lyco``), the one a project
describes (``adapter``), block-wise settings (``blocks``), kohya/diffusers names (``layout``)
and the file's metadata (``metadata``)."""
