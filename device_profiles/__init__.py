"""Package data: the device-kind catalogue (``kinds.yaml``) and cluster presets (``clusters/*.yaml``).

Read them with :mod:`distplan.profiles`.
"""
