"""Netback's grant operations (Xen's gnttab): check, map, unmap, copy (gntmap), the CPU's and the
DMA's view of the frontend's pages, per-fragment TX grants (tx), persistent and staging grants."""
