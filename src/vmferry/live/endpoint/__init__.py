"""vmferry's own migration endpoint: a machine of Python device models (:mod:`.machine`), its live
migration behind QMP (:mod:`.endpoint`), and the ``vmferry serve`` loop (:mod:`.serve`)."""
