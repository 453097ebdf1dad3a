"""Search spaces as YAML presets (``demo``, ``linear``, ``attention``, ``difformer``,
``diffeed``); :func:`difftune.search.space.load_space` reads them by name."""
