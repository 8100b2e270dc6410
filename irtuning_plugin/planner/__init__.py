"""``irtuning plan``: what a training recipe costs on a GPU, counted on the meta device (see ``command.py``)."""
