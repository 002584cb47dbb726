"""The adapter-layer protocol and what every adapter kind shares.

- :mod:`.layer`: :class:`~.layer.AdapterLayer` (the wrapper protocol), per-sample selection,
  ``disable_adapters``;
- :mod:`.registry`: the explicit table of which wrapper each base module type gets;
- :mod:`.targets` (+ :mod:`.aliases`): which modules a config adapts;
- :mod:`.inject`: adding, deleting and selecting adapters, freezing the base;
- :mod:`.params`: the one listing of adapter parameters; :mod:`.report`: the add-adapter report;
- :mod:`.tensors`: the one check of file tensors against an adapter;
- :mod:`.state`: :class:`~.state.AdapterState`, the one object holding adapter configs and AdaLoRA
  allocators (``adapter_state(model)``, also ``add_adapter(...).state``).
"""

from .state import AdapterState, adapter_state

__all__ = ["AdapterState", "adapter_state"]
