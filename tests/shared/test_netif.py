"""Wire formats must match Xen's netif.h byte for byte."""

from shared.protocol import netif


def test_struct_sizes_match_netif_h():
    assert netif.TX_REQUEST.size == 12
    assert netif.TX_RESPONSE.size == 4
    assert netif.RX_REQUEST.size == 8
    assert netif.RX_RESPONSE.size == 8
    assert netif.EXTRA_INFO.size == 8


def test_flags_and_statuses_match_linux():
    assert (netif.NETTXF_csum_blank, netif.NETTXF_data_validated, netif.NETTXF_more_data,
            netif.NETTXF_extra_info) == (1, 2, 4, 8)
    assert (netif.NETRXF_data_validated, netif.NETRXF_csum_blank, netif.NETRXF_more_data,
            netif.NETRXF_extra_info) == (1, 2, 4, 8)
    assert (netif.XEN_NETIF_RSP_DROPPED, netif.XEN_NETIF_RSP_ERROR, netif.XEN_NETIF_RSP_OKAY,
            netif.XEN_NETIF_RSP_NULL) == (-2, -1, 0, 1)
    # our addition does not collide with Linux's flags
    assert netif.NETTXF_header_slot not in (1, 2, 4, 8)


def test_ring_of_256_fits_a_page():
    assert 64 + netif.RING_SIZE * netif.TX_REQUEST.size <= netif.PAGE_SIZE
    assert 64 + netif.RING_SIZE * netif.RX_REQUEST.size <= netif.PAGE_SIZE


def test_tx_request_layout():
    raw = netif.TX_REQUEST.pack(0x01020304, 5, 6, 7, 8)
    assert raw == bytes([4, 3, 2, 1, 5, 0, 6, 0, 7, 0, 8, 0])
