"""The pynetdicom ceiling of bench/dicom_net.py: a bare storage SCP built as our listener
is (dicom.net: ``make_ae``'s contexts, transfer syntaxes and maximum PDU, TCP_NODELAY on
accepted sockets, the DUL poll delay, the prompt reactor, no standard log handlers), whose
C-STORE handler does no work.

Modes: ``null`` answers Success without touching the data set; ``devnull`` first writes the
data set's bytes (``encoded_dataset``, as the listener takes them) to /dev/null. Runs until SIGTERM.

Usage: python bench/dicom_ceiling.py AE_TITLE PORT {null,devnull}
"""
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pynetdicom import evt  # noqa: E402

from dicom.net import (DUL_POLL_SECONDS, SUCCESS, _NoDelayServer, prompt_reactor,  # noqa: E402
                       make_ae, quiet_standard_handlers)

MODES = ("null", "devnull")


def on_requested(event):
    event.assoc.dul._run_loop_delay = DUL_POLL_SECONDS  # as Listener._on_requested
    prompt_reactor(event.assoc)  # as Listener._on_requested


def on_echo(event):
    return SUCCESS


def on_store_null(event):
    return SUCCESS


def store_devnull(sink):
    def on_store(event):
        sink.write(event.encoded_dataset(include_meta=False))  # as the listener takes it
        return SUCCESS
    return on_store


def main():
    ae_title, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if mode not in MODES:
        sys.exit(f"mode: one of {', '.join(MODES)}")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # as the dicom-listener command
    quiet_standard_handlers()  # as Listener.start
    on_store = on_store_null if mode == "null" else store_devnull(open(os.devnull, "wb"))
    ae = make_ae(ae_title, max_associations=10, timeout=60)
    handlers = [(evt.EVT_REQUESTED, on_requested), (evt.EVT_C_ECHO, on_echo),
                (evt.EVT_C_STORE, on_store)]
    server = ae.make_server(("127.0.0.1", port), ae_title=ae_title, evt_handlers=handlers,
                            server_class=_NoDelayServer)
    server.serve_forever()


if __name__ == "__main__":
    main()
