"""The kernels, one module per operation (private; the public layer functions are in
:mod:`minference_kernels.api`).

Each operation has its PyTorch reference (the CPU path and what the tests compare against) in
``<op>.py`` and its Triton kernel beside it in ``<op>_triton.py``:

=================  ==========================================================================
``attention``      attention over a :class:`~minference_kernels.index.SparseIndex`; dense and
                   streaming attention on the PyTorch path
``index_build``    slash offsets to relative tiles, windows, block-sparse pieces, index assembly
``vs_scores``      vertical-slash scores of the last queries and the column / diagonal selection
``block_select``   block-sparse estimation: pooled scores, per-query-block selection, budgets
``block_sampled``  sampled block scoring (``scoring="sampled"``)
``head_rank``      the head-wide ranking of ``allocation="head"`` / ``"layer"``
``varlen``         packed batches of different lengths (:mod:`minference_kernels.varlen` holds
                   the public function and the PyTorch path): batched vertical-slash scores and
                   one attention launch for the batch (``varlen_triton`` only)
=================  ==========================================================================

Imports only go one way: ``index`` <- ``ops._common`` / ``ops._triton_common`` <- the
references <- their Triton modules. A reference never imports a Triton module by name: it asks
:func:`minference_kernels.ops._dispatch.pick` for the backend's implementation (Triton is an
optional dependency, imported on first use). Importing this package imports nothing.
"""
