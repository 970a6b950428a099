"""A node that rejects our association: the error says what to check, and echoes no AE title."""

import pytest
from pynetdicom import AE, build_context
from pynetdicom.sop_class import Verification

from nnunet_bento.pacs.connect import NodeError, associate
from nnunet_bento.pacs.nodes import DimseNode


@pytest.fixture
def strict_scp():
    """A real DIMSE peer that accepts only the called AE title STRICT_SCP."""
    ae = AE(ae_title="STRICT_SCP")
    ae.require_called_aet = True
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", 0), block=False)
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()


def test_a_rejected_association_echoes_no_ae_title(strict_scp):
    node = DimseNode(
        name="pacs",
        host="127.0.0.1",
        port=strict_scp,
        ae_title="SECRET_CALLED",
        calling_ae_title="SECRET_CALLING",
    )
    with pytest.raises(NodeError) as refused:
        associate(node, [build_context(Verification)], timeout=10)
    message = str(refused.value)
    assert message.startswith("DICOM node 'pacs': association rejected")
    assert "SECRET_CALLED" not in message and "SECRET_CALLING" not in message


def test_the_right_ae_title_is_accepted(strict_scp):
    node = DimseNode(name="pacs", host="127.0.0.1", port=strict_scp, ae_title="STRICT_SCP")
    association = associate(node, [build_context(Verification)], timeout=10)
    try:
        assert association.is_established
    finally:
        association.release()
