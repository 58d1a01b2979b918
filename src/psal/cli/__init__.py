"""The ``psal`` command (``psal inpaint | colorize | upscale | reconstruct | demo``); it prints, the library does not."""
