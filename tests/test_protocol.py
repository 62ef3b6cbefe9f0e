"""i-PI wire framing: round trips through real socket pairs, errors, unit conversions."""

import socket
import threading

import numpy as np
import pytest
from ase import units
from rarefly import protocol
from rarefly.protocol import (
    Channel,
    ConnectionClosed,
    ForceResult,
    ProtocolError,
    encode_forceready,
    encode_init,
    encode_posdata,
    header,
    ipi_transpose,
    read_forceready,
    read_init,
    read_posdata,
)

CELL = np.array([[5.3, 0.0, 0.0], [0.4, 5.1, 0.0], [0.2, -0.3, 5.4]])  # rows, triclinic


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    yield Channel(a), b
    a.close()
    b.close()


def feed(sock, data: bytes, close=True):
    """Send ``data`` (small: it fits the socket buffer) and, by default, close for writing."""
    sock.sendall(data)
    if close:
        sock.shutdown(socket.SHUT_WR)


def test_headers_are_twelve_space_padded_bytes():
    for name in protocol.HEADERS:
        h = header(name)
        assert len(h) == 12 and h.rstrip(b" ") == name.encode()
    assert header("status") == b"STATUS      "
    with pytest.raises(ValueError):
        header("THIRTEENCHARS")


def test_header_round_trip(pair):
    ch, peer = pair
    feed(peer, b"".join(header(n) for n in protocol.HEADERS))
    assert [ch.recv_header() for _ in protocol.HEADERS] == list(protocol.HEADERS)
    with pytest.raises(ConnectionClosed, match="^expected a message header, but the "
                                               "connection closed$"):
        ch.recv_header()


def test_header_split_over_many_sends(pair):
    ch, peer = pair

    def slow():
        for byte in header("POSDATA"):
            peer.send(bytes([byte]))

    t = threading.Thread(target=slow)
    t.start()
    assert ch.recv_header() == "POSDATA"
    t.join()


def test_garbage_header(pair):
    ch, peer = pair
    feed(peer, b"HELLO WORLD!")
    with pytest.raises(ProtocolError) as err:
        ch.recv_header()
    assert str(err.value) == ("expected a message header (STATUS, READY, HAVEDATA, NEEDINIT, "
                              "INIT, POSDATA, GETFORCE, FORCEREADY, EXIT), but received the "
                              "12 bytes b'HELLO WORLD!'")
    assert not isinstance(err.value, ConnectionClosed)


def test_truncated_header(pair):
    ch, peer = pair
    feed(peer, b"STAT")
    with pytest.raises(ConnectionClosed) as err:
        ch.recv_header()
    assert str(err.value) == ("expected a 12-byte message header (12 bytes), but the "
                              "connection closed after 4 of them")


def test_array_round_trip_exact_lengths(pair):
    ch, peer = pair
    values = np.linspace(-3, 7, 11)
    feed(peer, values.tobytes() + np.int32(-42).tobytes() + b"xyz", close=False)
    np.testing.assert_array_equal(ch.recv_array(np.float64, 11, "eleven reals"), values)
    assert ch.recv_int32("an int") == -42
    assert ch.recv_exact(3, "three bytes") == b"xyz"


def test_init_with_batch_size(pair):
    ch, peer = pair
    feed(peer, encode_init("foo: 1, batch_size:4", bead_index=3))
    assert ch.recv_header() == "INIT"
    init = read_init(ch)
    assert (init.bead_index, init.parameters, init.batch_size) == (3, "foo: 1, batch_size:4", 4)


def test_init_as_ase_sends_it(pair):
    # ASE's SocketIOCalculator sends bead 0 and a single zero byte.
    ch, peer = pair
    feed(peer, header("INIT") + np.int32(0).tobytes() + np.int32(1).tobytes() + b"\x00")
    ch.recv_header()
    assert read_init(ch).batch_size == 1


@pytest.mark.parametrize("text,message", [
    ("batch_size:two", "expected an integer after 'batch_size:' in INIT, but received 'two'"),
    ("batch_size:0", "expected a positive batch_size in INIT, but received 0"),
])
def test_bad_batch_size(pair, text, message):
    ch, peer = pair
    feed(peer, encode_init(text))
    ch.recv_header()
    with pytest.raises(ProtocolError) as err:
        read_init(ch)
    assert str(err.value) == message


def test_posdata_round_trip_and_units(pair):
    ch, peer = pair
    rng = np.random.default_rng(0)
    pos = rng.normal(size=(5, 3)) * 3
    msg = encode_posdata([(CELL, pos)])
    assert len(msg) == 12 + 72 + 72 + 4 + 5 * 24
    # The cell travels in Bohr with lattice vectors as columns (i-PI's h).
    h = np.frombuffer(msg[12:84], dtype=np.float64).reshape(3, 3)
    np.testing.assert_allclose(h, CELL.T / units.Bohr, rtol=1e-15)
    np.testing.assert_allclose(np.frombuffer(msg[160:], dtype=np.float64).reshape(5, 3),
                               pos / units.Bohr, rtol=1e-15)
    feed(peer, msg)
    assert ch.recv_header() == "POSDATA"
    (frame,) = read_posdata(ch)
    np.testing.assert_allclose(frame.cell, CELL, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(frame.inverse_cell, np.linalg.inv(CELL), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(frame.positions, pos, rtol=1e-14)


def test_posdata_as_ase_sends_it(pair):
    # ASE's IPIProtocol.sendposdata: cell.T and pinv(cell) in atomic units.
    from ase.calculators.socketio import IPIProtocol

    ch, peer = pair
    pos = np.arange(12.0).reshape(4, 3) * 0.7
    t = threading.Thread(target=lambda: IPIProtocol(peer).sendposdata(
        CELL, np.linalg.pinv(CELL).T, pos))
    t.start()
    assert ch.recv_header() == "POSDATA"
    (frame,) = read_posdata(ch)
    t.join()
    np.testing.assert_allclose(frame.cell, CELL, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(frame.positions, pos, rtol=1e-14, atol=1e-14)


def test_batched_posdata_layout(pair):
    ch, peer = pair
    frames = [(CELL * (1 + 0.01 * b), np.full((3, 3), float(b))) for b in range(3)]
    msg = encode_posdata(frames, batched=True)
    assert np.frombuffer(msg[12:16], dtype=np.int32)[0] == 3  # atom count comes first
    feed(peer, msg)
    ch.recv_header()
    got = read_posdata(ch, batch_size=3)
    for (cell, pos), frame in zip(frames, got):
        np.testing.assert_allclose(frame.cell, cell, rtol=1e-14, atol=1e-14)
        np.testing.assert_allclose(frame.positions, pos, rtol=1e-14, atol=1e-14)


def test_truncated_posdata(pair):
    ch, peer = pair
    msg = encode_posdata([(CELL, np.zeros((9, 3)))])
    feed(peer, msg[:-100])
    ch.recv_header()
    with pytest.raises(ConnectionClosed) as err:
        read_posdata(ch)
    assert str(err.value) == ("expected the POSDATA positions of 9 atoms (216 bytes), but the "
                              "connection closed after 116 of them")


def test_negative_atom_count(pair):
    ch, peer = pair
    feed(peer, header("POSDATA") + np.zeros(18).tobytes() + np.int32(-5).tobytes())
    ch.recv_header()
    with pytest.raises(ProtocolError) as err:
        read_posdata(ch)
    assert str(err.value) == ("expected an atom count between 0 and 10000000 in POSDATA, but "
                              "received -5")


def _result(n, seed, extras='{"a":1}'):
    rng = np.random.default_rng(seed)
    vir = rng.normal(size=(3, 3))
    return ForceResult(float(rng.normal()), rng.normal(size=(n, 3)), vir, extras)


def test_forceready_round_trip_and_layout(pair):
    ch, peer = pair
    res = _result(4, 1, extras='{"energy_uncertainty":0.5,"x":"é"}')
    msg = encode_forceready([res])
    extras = res.extras.encode("utf-8")
    assert len(msg) == 12 + 8 + 4 + 4 * 24 + 72 + 4 + len(extras)
    assert np.frombuffer(msg[12:20], np.float64)[0] == pytest.approx(res.energy / units.Ha,
                                                                     rel=1e-15)
    wire_vir = np.frombuffer(msg[12 + 12 + 96: 12 + 12 + 96 + 72], np.float64).reshape(3, 3)
    np.testing.assert_allclose(wire_vir, res.virial.T / units.Ha, rtol=1e-15)  # i-PI layout
    assert msg.endswith(np.int32(len(extras)).tobytes() + extras)
    feed(peer, msg)
    assert ch.recv_header() == "FORCEREADY"
    (back,) = read_forceready(ch)
    assert back.energy == pytest.approx(res.energy, rel=1e-15)
    np.testing.assert_allclose(back.forces, res.forces, rtol=1e-14)
    np.testing.assert_allclose(back.virial, res.virial, rtol=1e-14)
    assert back.extras == res.extras


def test_forceready_read_by_ase(pair):
    # ASE's own server-side reader gives the same numbers back.
    from ase.calculators.socketio import IPIProtocol

    ch, peer = pair
    res = _result(3, 2)
    feed(ch.sock, encode_forceready([res]), close=False)
    ase_side = IPIProtocol(peer)
    assert ase_side.recvmsg() == "FORCEREADY"
    e = ase_side.recv(1, np.float64)[0] * units.Ha
    nat = ase_side.recv(1, np.int32)[0]
    f = ase_side.recv((nat, 3), np.float64) * units.Ha / units.Bohr
    vir = ase_side.recv((3, 3), np.float64).T * units.Ha
    nx = ase_side.recv(1, np.int32)[0]
    assert ase_side.recv(nx, np.byte).tobytes() == res.extras.encode()
    assert e == pytest.approx(res.energy, rel=1e-15)
    np.testing.assert_allclose(f, res.forces, rtol=1e-14)
    np.testing.assert_allclose(vir, res.virial, rtol=1e-14)


def test_batched_forceready_round_trip(pair):
    ch, peer = pair
    results = [_result(2, s, extras=f'{{"i":{s}}}') for s in range(3)]
    feed(peer, encode_forceready(results, batched=True))
    ch.recv_header()
    back = read_forceready(ch, batch_size=3)
    for r, b in zip(results, back):
        assert b.energy == pytest.approx(r.energy, rel=1e-15)
        np.testing.assert_allclose(b.forces, r.forces, rtol=1e-14)
        np.testing.assert_allclose(b.virial, r.virial, rtol=1e-14)
        assert b.extras == r.extras


def test_forceready_rejects_wrong_force_shape():
    bad = ForceResult(0.0, np.zeros((2, 3)), np.zeros((3, 3)))
    good = ForceResult(0.0, np.zeros((3, 3)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"forces have shape \(2, 3\); expected \(3, 3\)"):
        encode_forceready([good, bad], batched=True)


def test_unit_conversions_and_transpose():
    assert protocol.ipi_transpose(ipi_transpose(CELL)).tolist() == CELL.tolist()
    np.testing.assert_array_equal(ipi_transpose(CELL), CELL.T)
    # Constants are ase.units' (CODATA 2014); i-PI's own agree to about 1e-7.
    assert protocol.BOHR_TO_ANGSTROM == units.Bohr == pytest.approx(0.529177210544, rel=1e-7)
    assert protocol.HARTREE_TO_EV == units.Hartree == pytest.approx(27.211386245981, rel=1e-7)
    assert protocol.FORCE_EV_A_TO_AU == pytest.approx(units.Bohr / units.Ha, rel=1e-15)
