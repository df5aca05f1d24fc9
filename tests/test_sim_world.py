"""The pure model behind wabridge-sim (``sim.world``): no sockets, a fake clock."""

from __future__ import annotations

import base64
import hashlib
import random
from typing import Any

import pytest

from sim.world import Action, Close, Send, World, WorldError

ACCOUNT = "5511999990001"
CONTACT = "5511999990002"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def world(clock: Clock) -> World:
    return World(qr_rotate=20.0, qr_max=3, clock=clock, rng=random.Random(7))


def frames(actions: list[Action], conn: int | None = None) -> list[dict[str, Any]]:
    return [a.frame for a in actions if isinstance(a, Send) and (conn is None or a.conn == conn)]


def types(actions: list[Action], conn: int | None = None) -> list[str]:
    return [f["type"] for f in frames(actions, conn)]


def closes(actions: list[Action]) -> list[Close]:
    return [a for a in actions if isinstance(a, Close)]


def hello(world: World, token: str | None = None) -> tuple[int, list[Action]]:
    conn = world.open_conn()
    return conn, world.device_frame(conn, {"type": "hello", "token": token})


def link(world: World, phone: str = ACCOUNT) -> tuple[int, str]:
    """A device linked by QR: (connection id, token)."""
    conn, actions = hello(world)
    code = frames(actions)[0]["code"]
    linked = world.scan(phone, {"code": code})
    token = frames(linked)[0]["token"]
    return conn, token


def post(world: World, **body: Any) -> tuple[str, list[Action]]:
    return world.post_message({"from": CONTACT, "to": ACCOUNT, "text": "hi", **body})


# --------------------------------------------------------------------------- QR and pairing


def test_hello_without_token_shows_a_qr(world: World) -> None:
    conn, actions = hello(world)
    assert types(actions) == ["qr"]
    assert frames(actions)[0]["code"].startswith("sim-qr:")
    assert world.pending_qr()[0]["conn"] == conn


def test_scan_links_the_device_and_connects(world: World) -> None:
    conn, actions = hello(world)
    code = frames(actions)[0]["code"]
    linked = world.scan(ACCOUNT, {"code": code, "push_name": "Alice"})
    assert types(linked, conn) == ["paired", "connected"]
    paired, connected = frames(linked)
    assert paired["jid"] == f"{ACCOUNT}@s.whatsapp.net"
    assert paired["phone"] == ACCOUNT and paired["push_name"] == "Alice"
    assert len(paired["token"]) >= 32
    assert connected == {
        "type": "connected",
        "jid": f"{ACCOUNT}@s.whatsapp.net",
        "phone": ACCOUNT,
        "push_name": "Alice",
    }
    state = world.account_state(ACCOUNT)
    assert state["linked"] and state["connected"] and len(state["devices"]) == 1
    assert world.pending_qr() == []


@pytest.mark.parametrize(
    ("scenario", "status", "error"),
    [
        ("unknown", 404, "unknown_code"),
        ("rotated", 410, "code_expired"),
        ("used", 410, "code_already_used"),
        ("closed", 410, "code_expired"),
    ],
)
def test_scan_bad_codes(world: World, clock: Clock, scenario: str, status: int, error: str) -> None:
    conn, actions = hello(world)
    code = frames(actions)[0]["code"]
    if scenario == "unknown":
        code = "sim-qr:nope"
    elif scenario == "rotated":
        clock.now += 21
        assert types(world.tick()) == ["qr"]
    elif scenario == "used":
        world.scan(ACCOUNT, {"code": code})
    elif scenario == "closed":
        world.close_conn(conn)
    with pytest.raises(WorldError) as info:
        world.scan("5511999990005", {"code": code})
    assert (info.value.status, info.value.code, info.value.field) == (status, error, "code")


def test_qr_rotates_then_expires_after_qr_max(world: World, clock: Clock) -> None:
    conn, actions = hello(world)
    codes = [frames(actions)[0]["code"]]
    assert world.tick() == []  # not due yet
    for _ in range(2):
        clock.now += 20
        rotated = world.tick()
        assert types(rotated) == ["qr"]
        codes.append(frames(rotated)[0]["code"])
    assert len(set(codes)) == 3
    clock.now += 20
    last = world.tick()
    assert types(last) == ["qr_expired"]
    assert closes(last) == [Close(conn)]
    assert world.pending_qr() == []
    with pytest.raises(WorldError):
        world.scan(ACCOUNT, {"code": codes[-1]})


def test_pairing_code_links_like_a_scan(world: World) -> None:
    conn, _ = hello(world)
    reply = world.device_frame(conn, {"type": "pair_phone", "phone": ACCOUNT})
    code = frames(reply)[0]["code"]
    assert len(code) == 9 and code[4] == "-"
    with pytest.raises(WorldError) as info:
        world.pairing_link("5511999990005", {"code": code})  # another phone
    assert info.value.status == 404
    linked = world.pairing_link(ACCOUNT, {"code": code.lower().replace("-", "")})
    assert types(linked, conn) == ["paired", "connected"]
    with pytest.raises(WorldError) as info:
        world.pairing_link(ACCOUNT, {"code": code})
    assert info.value.status == 410


# --------------------------------------------------------------------------- tokens


def test_token_reconnects_without_qr(world: World) -> None:
    conn, token = link(world)
    world.close_conn(conn)
    assert not world.account_state(ACCOUNT)["connected"]
    conn2, actions = hello(world, token)
    assert types(actions) == ["connected"]
    assert world.account_state(ACCOUNT)["connected"]
    assert conn2 != conn


def test_unknown_token_gets_a_qr(world: World) -> None:
    _conn, actions = hello(world, "not-a-token")
    assert types(actions) == ["qr"]


def test_second_connection_with_same_token_replaces_the_first(world: World) -> None:
    conn, token = link(world)
    conn2, actions = hello(world, token)
    assert types(actions, conn) == ["stream_replaced"]
    assert closes(actions) == [Close(conn)]
    assert types(actions, conn2) == ["connected"]


# --------------------------------------------------------------------------- messages


def test_message_is_delivered_to_a_connected_device(world: World) -> None:
    conn, _ = link(world)
    msg_id, actions = post(world, text="hello")
    (frame,) = frames(actions, conn)
    assert frame["id"] == msg_id and msg_id.startswith("3EB0")
    assert frame["chat"] == f"{CONTACT}@s.whatsapp.net"
    assert frame["sender"] == f"{CONTACT}@s.whatsapp.net"
    assert frame["text"] == "hello" and not frame["is_group"]


def test_messages_queue_while_offline_and_arrive_on_connect(world: World) -> None:
    conn, token = link(world)
    world.close_conn(conn)
    first, offline1 = post(world, text="one")
    second, offline2 = post(world, text="two")
    assert offline1 == offline2 == []
    _conn2, actions = hello(world, token)
    assert types(actions) == ["connected", "message", "message"]
    assert [f["id"] for f in frames(actions)[1:]] == [first, second]


def test_unacked_messages_are_redelivered_acked_ones_are_not(world: World) -> None:
    conn, token = link(world)
    acked, _ = post(world, text="acked")
    unacked, _ = post(world, text="unacked")
    assert world.device_frame(conn, {"type": "ack", "id": acked}) == []
    world.close_conn(conn)
    conn2, actions = hello(world, token)
    assert [f["id"] for f in frames(actions) if f["type"] == "message"] == [unacked]
    world.device_frame(conn2, {"type": "ack", "id": unacked})
    world.close_conn(conn2)
    _conn3, actions = hello(world, token)
    assert types(actions) == ["connected"]


def test_same_explicit_id_twice_is_delivered_twice(world: World) -> None:
    conn, _ = link(world)
    _, first = post(world, id="3EB0DUP")
    _, second = post(world, id="3EB0DUP")
    assert [f["id"] for f in frames(first + second, conn)] == ["3EB0DUP", "3EB0DUP"]
    world.device_frame(conn, {"type": "ack", "id": "3EB0DUP"})
    assert world.account_state(ACCOUNT)["devices"][0]["pending"] == 1


def test_group_mention_quote_and_image(world: World) -> None:
    conn, _ = link(world)
    _, sent = world.post_message({"from": CONTACT, "to": ACCOUNT, "text": "question"})
    question = frames(sent)[0]["id"]
    reply = world.device_frame(
        conn,
        {
            "type": "send",
            "req": 1,
            "to": f"{CONTACT}@s.whatsapp.net",
            "text": "answer",
            "quote_id": question,
        },
    )
    answer_id = frames(reply)[0]["id"]
    _, actions = post(world, group="team-1", mentions=[ACCOUNT], text="@bot hi")
    frame = frames(actions)[0]
    assert frame["chat"] == "team-1@g.us" and frame["is_group"] and frame["mentioned"]
    _, actions = post(world, group="team-1", quoted_id=answer_id, text="thanks")
    frame = frames(actions)[0]
    assert frame["mentioned"]  # replying to the account counts as a mention
    assert frame["quoted_text"] == "answer"
    data = base64.b64encode(b"\x89PNG fake").decode()
    _, actions = post(
        world, text="", image={"mime_type": "image/png", "data_b64": data, "caption": "see"}
    )
    frame = frames(actions)[0]
    assert frame["text"] == "see" and frame["image"]["data_b64"] == data
    _, actions = post(world, text="", media="audio")
    assert frames(actions)[0]["media"] == "audio"


# --------------------------------------------------------------------------- device sends


def test_send_lands_in_the_contact_inbox(world: World, clock: Clock) -> None:
    conn, _ = link(world)
    msg_id, _ = post(world)
    reply = world.device_frame(
        conn,
        {
            "type": "send",
            "req": 7,
            "to": f"{CONTACT}@s.whatsapp.net",
            "text": "yo",
            "quote_id": msg_id,
        },
    )
    (sent,) = frames(reply)
    assert sent["type"] == "sent" and sent["req"] == 7
    assert world.contact_inbox(CONTACT) == [
        {
            "id": sent["id"],
            "from": ACCOUNT,
            "chat": f"{CONTACT}@s.whatsapp.net",
            "text": "yo",
            "quoted_id": msg_id,
            "ts": clock.now,
            "by": "device",
            "via": "",  # the client label of the sending connection (none given here)
        }
    ]
    assert world.contact_inbox("5511999990099") == []


@pytest.mark.parametrize(
    ("frame", "error"),
    [
        ({"to": "5511000000000@s.whatsapp.net", "text": "x"}, "unknown chat"),
        ({"to": "nobody@g.us", "text": "x"}, "unknown chat"),
        ({"to": "garbage", "text": "x"}, "unknown chat"),
        ({"to": 5, "text": "x"}, "to:"),
        ({"to": f"{CONTACT}@s.whatsapp.net", "text": ""}, "text:"),
        ({"to": f"{CONTACT}@s.whatsapp.net", "text": "x", "quote_id": 3}, "quote_id:"),
    ],
)
def test_send_errors(world: World, frame: dict[str, Any], error: str) -> None:
    conn, _ = link(world)
    post(world)
    (reply,) = frames(world.device_frame(conn, {"type": "send", "req": 1, **frame}))
    assert reply["type"] == "send_error" and reply["req"] == 1
    assert error in reply["error"]


def test_reactions_and_media_land_in_the_contact_inbox(world: World) -> None:
    conn, _ = link(world)
    msg_id, _ = post(world)
    chat = f"{CONTACT}@s.whatsapp.net"
    world.device_frame(conn, {"type": "send", "req": 1, "to": chat, "text": "",
                              "reaction": {"target_id": msg_id, "emoji": "👍"}})
    data = base64.b64encode(b"a,b\n1,2\n").decode()
    world.device_frame(conn, {"type": "send", "req": 2, "to": chat, "text": "the table",
                              "media": {"kind": "document", "filename": "t.csv",
                                        "mime": "text/csv", "data": data}})
    reaction, document = world.contact_inbox(CONTACT)
    assert reaction["reaction"] == {"target_id": msg_id, "emoji": "👍"}
    assert reaction["text"] == ""
    assert document["text"] == "the table" and document["media"] == {
        "kind": "document", "filename": "t.csv", "mime": "text/csv", "size": 8,
        "sha256": hashlib.sha256(b"a,b\n1,2\n").hexdigest()}


@pytest.mark.parametrize(("extra", "error"), [
    ({"reaction": {"target_id": "X"}}, "reaction:"),
    ({"media": {"kind": "video", "filename": "v", "mime": "v", "data": ""}}, "media: kind"),
    ({"media": {"kind": "document", "filename": "f", "mime": "m", "data": "!!"}}, "base64"),
])
def test_bad_reactions_and_media_are_refused(world: World, extra: dict[str, Any],
                                             error: str) -> None:
    conn, _ = link(world)
    post(world)
    (reply,) = frames(world.device_frame(conn, {"type": "send", "req": 1, "text": "",
                                                "to": f"{CONTACT}@s.whatsapp.net", **extra}))
    assert reply["type"] == "send_error" and error in reply["error"]


def test_send_before_linking_is_refused(world: World) -> None:
    conn, _ = hello(world)
    (reply,) = frames(world.device_frame(conn, {"type": "send", "req": 1, "to": "x", "text": "y"}))
    assert reply == {"type": "send_error", "req": 1, "error": "not connected"}


def test_typing_and_read_are_recorded(world: World) -> None:
    conn, _ = link(world)
    msg_id, _ = post(world)
    chat = f"{CONTACT}@s.whatsapp.net"
    world.device_frame(conn, {"type": "typing", "to": chat, "on": True})
    world.device_frame(conn, {"type": "read", "chat": chat, "ids": [msg_id, msg_id]})
    state = world.account_state(ACCOUNT)
    assert state["typing"] == {chat: True} and state["read_ids"] == [msg_id]


@pytest.mark.parametrize(
    ("frame", "error"),
    [
        ("not an object", "JSON object"),
        ({"type": 3}, "JSON object"),
        ({"type": "dance"}, "unknown frame type"),
        ({"type": "hello", "token": None}, "already sent"),
        ({"type": "ack", "id": 5}, "ack: id"),
        ({"type": "send", "req": "one"}, "req"),
        ({"type": "typing", "to": "x"}, "typing:"),
        ({"type": "read", "ids": "x"}, "read:"),
        ({"type": "pair_phone", "phone": "+55"}, "pair_phone:"),
    ],
)
def test_bad_frames_get_error_frames(world: World, frame: Any, error: str) -> None:
    conn, _ = link(world)
    (reply,) = frames(world.device_frame(conn, frame))
    assert reply["type"] == "error" and error in reply["error"]


def test_frames_before_hello_are_refused(world: World) -> None:
    conn = world.open_conn()
    (reply,) = frames(world.device_frame(conn, {"type": "ack", "id": "x"}))
    assert "hello first" in reply["error"]


# --------------------------------------------------------------------------- outcomes


@pytest.mark.parametrize(
    ("outcome", "body", "frame_type", "abrupt", "token_still_valid"),
    [
        ("logout", None, "logged_out", False, False),
        ("replace", None, "stream_replaced", False, True),
        ("outdated", None, "client_outdated", False, True),
        ("disconnect", None, None, True, True),
        ("ban", {"expires_in": 60}, "temporary_ban", False, False),
    ],
)
def test_outcomes(
    world: World,
    clock: Clock,
    outcome: str,
    body: Any,
    frame_type: str | None,
    abrupt: bool,
    token_still_valid: bool,
) -> None:
    conn, token = link(world)
    actions = world.outcome(ACCOUNT, outcome, body)
    assert types(actions, conn) == ([frame_type] if frame_type else [])
    assert closes(actions) == [Close(conn, abrupt=abrupt)]
    assert not world.account_state(ACCOUNT)["connected"]
    world.close_conn(conn)
    _conn2, again = hello(world, token)
    if token_still_valid:
        assert types(again) == ["connected"]
    elif outcome == "logout":
        assert types(again) == ["logged_out"]
        assert not world.account_state(ACCOUNT)["linked"]
    else:  # banned: refused until the ban expires
        assert types(again) == ["temporary_ban"]
        assert frames(again)[0]["expires_at"] == clock.now + 60
        clock.now += 61
        _conn3, later = hello(world, token)
        assert types(later) == ["connected"]


@pytest.mark.parametrize("outcome", ["replace", "outdated", "disconnect"])
def test_outcomes_need_a_connected_device(world: World, outcome: str) -> None:
    conn, _ = link(world)
    world.close_conn(conn)
    with pytest.raises(WorldError) as info:
        world.outcome(ACCOUNT, outcome)
    assert info.value.status == 409


def test_banned_phone_cannot_link(world: World) -> None:
    link(world)
    world.outcome(ACCOUNT, "ban", {"expires_in": 60})
    _conn, actions = hello(world)
    with pytest.raises(WorldError) as info:
        world.scan(ACCOUNT, {"code": frames(actions)[0]["code"]})
    assert info.value.status == 403


# --------------------------------------------------------------------------- the owner's phone


def own(world: World, **body: Any) -> tuple[str, list[Action]]:
    return world.owner_message(ACCOUNT, {"text": "note to self", **body})


def test_owner_writes_in_the_self_chat(world: World, clock: Clock) -> None:
    conn, _ = link(world)
    msg_id, actions = own(world)
    (frame,) = frames(actions, conn)
    me = f"{ACCOUNT}@s.whatsapp.net"
    # delivered to the linked device as the account's own message in its own chat
    assert (frame["id"], frame["chat"], frame["sender"], frame["from_me"]) == (
        msg_id, me, me, True)
    assert frame["text"] == "note to self" and not frame["is_group"]
    # the device answers in the self chat: both sides are in the account's self chat
    reply = world.device_frame(conn, {"type": "send", "req": 1, "to": me, "text": "noted",
                                      "quote_id": msg_id})
    assert types(reply) == ["sent"]
    chat = world.self_chat(ACCOUNT)
    assert [(m["text"], m["by"], m["chat"]) for m in chat] == [
        ("note to self", "phone", me), ("noted", "device", me)]
    assert chat[1]["quoted_id"] == msg_id
    assert world.contact_inbox(ACCOUNT) == []  # no contact got any of it


def test_writing_to_ones_own_number_is_the_self_chat(world: World) -> None:
    conn, _ = link(world)
    _msg_id, actions = own(world, to=ACCOUNT)
    assert frames(actions, conn)[0]["chat"] == f"{ACCOUNT}@s.whatsapp.net"
    assert len(world.self_chat(ACCOUNT)) == 1


def test_owner_writes_in_a_contacts_chat(world: World, clock: Clock) -> None:
    conn, _ = link(world)
    asked, _ = post(world, text="is anyone there?")
    msg_id, actions = own(world, to=CONTACT, text="yes, me", quoted_id=asked)
    (frame,) = frames(actions, conn)
    assert frame["chat"] == f"{CONTACT}@s.whatsapp.net"
    assert frame["sender"] == f"{ACCOUNT}@s.whatsapp.net" and frame["from_me"] is True
    assert frame["quoted_text"] == "is anyone there?"
    # the contact reads it as the account's message, marked as written on the phone
    assert world.contact_inbox(CONTACT) == [{
        "id": msg_id, "from": ACCOUNT, "chat": f"{CONTACT}@s.whatsapp.net", "text": "yes, me",
        "quoted_id": asked, "ts": clock.now, "by": "phone"}]
    assert world.self_chat(ACCOUNT) == []


def test_owner_writes_in_a_group_and_to_a_new_number(world: World) -> None:
    conn, _ = link(world)
    post(world, group="team", text="hi all")
    _msg_id, actions = own(world, group="team", text="hello team")
    (frame,) = frames(actions, conn)
    assert frame["chat"] == "team@g.us" and frame["is_group"] and frame["from_me"]
    assert [m["text"] for m in world.group_inbox("team")] == ["hello team"]
    assert [m["text"] for m in world.contact_inbox(CONTACT)] == ["hello team"]
    # a number nobody wrote from yet: the phone can write to it, like WhatsApp
    own(world, to="5511999990055", text="first contact")
    assert [m["by"] for m in world.contact_inbox("5511999990055")] == ["phone"]


def test_owner_messages_queue_for_an_offline_device(world: World) -> None:
    conn, token = link(world)
    world.close_conn(conn)
    msg_id, actions = own(world)
    assert actions == []
    _conn, actions = hello(world, token)
    assert types(actions) == ["connected", "message"]
    assert frames(actions)[1]["id"] == msg_id and frames(actions)[1]["from_me"] is True


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({}, 400, "text"),
        ({"text": "x", "to": "+55"}, 400, "to"),
        ({"text": "x", "to": CONTACT, "group": "team"}, 400, "group"),
        ({"text": "x", "group": "bad group!"}, 400, "group"),
        ({"text": "x", "group": "nosuchgroup"}, 404, "group"),
        ({"text": "x", "id": "has space"}, 400, "id"),
    ],
)
def test_owner_message_validation(world: World, body: dict[str, Any], status: int,
                                  field: str) -> None:
    link(world)
    with pytest.raises(WorldError) as info:
        world.owner_message(ACCOUNT, body)
    assert (info.value.status, info.value.field) == (status, field)
    with pytest.raises(WorldError) as unknown:
        world.owner_message("5511999990077", {"text": "x"})
    assert unknown.value.status == 404


def test_a_contact_cannot_pose_as_the_owner(world: World) -> None:
    link(world)
    with pytest.raises(WorldError) as info:
        world.post_message({"from": ACCOUNT, "to": ACCOUNT, "text": "x"})
    assert f"/api/accounts/{ACCOUNT}/messages" in info.value.message


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"from": "+5511", "to": ACCOUNT, "text": "x"}, "from"),
        ({"from": CONTACT, "to": "abc", "text": "x"}, "to"),
        ({"from": CONTACT, "to": ACCOUNT}, "text"),
        ({"from": CONTACT, "to": ACCOUNT, "text": 5}, "text"),
        ({"from": CONTACT, "to": ACCOUNT, "text": "x", "id": "has space"}, "id"),
        ({"from": CONTACT, "to": ACCOUNT, "text": "x", "group": "bad group!"}, "group"),
        ({"from": CONTACT, "to": ACCOUNT, "text": "x", "mentions": "all"}, "mentions"),
        ({"from": CONTACT, "to": ACCOUNT, "text": "x", "mentions": ["x"]}, "mentions"),
        ({"from": CONTACT, "to": ACCOUNT, "text": "x", "media": "hologram"}, "media"),
        ({"from": CONTACT, "to": ACCOUNT, "image": "pic"}, "image"),
        (
            {
                "from": CONTACT,
                "to": ACCOUNT,
                "image": {"mime_type": "text/plain", "data_b64": "AA=="},
            },
            "image.mime_type",
        ),
        (
            {
                "from": CONTACT,
                "to": ACCOUNT,
                "image": {"mime_type": "image/png", "data_b64": "!!!"},
            },
            "image.data_b64",
        ),
    ],
)
def test_post_message_validation(world: World, body: dict[str, Any], field: str) -> None:
    link(world)
    with pytest.raises(WorldError) as info:
        world.post_message(body)
    assert (info.value.status, info.value.field) == (400, field)
    assert info.value.message.startswith(field)


@pytest.mark.parametrize(
    ("call", "status"),
    [
        (lambda w: w.post_message([1, 2]), 400),
        (lambda w: w.post_message({"from": CONTACT, "to": "5511999990077", "text": "x"}), 404),
        (lambda w: w.scan("123", {"code": "x"}), 400),
        (lambda w: w.scan(ACCOUNT, {}), 400),
        (lambda w: w.scan(ACCOUNT, {"code": 5}), 400),
        (lambda w: w.account_state("5511999990077"), 404),
        (lambda w: w.outcome(ACCOUNT, "explode"), 404),
        (lambda w: w.outcome(ACCOUNT, "ban", {"expires_in": "soon"}), 400),
        (lambda w: w.outcome(ACCOUNT, "ban", {"expires_in": -1}), 400),
        (lambda w: w.group_inbox("bad id!"), 400),
    ],
)
def test_api_errors(world: World, call: Any, status: int) -> None:
    link(world)
    with pytest.raises(WorldError) as info:
        call(world)
    assert info.value.status == status
    assert info.value.to_json()["error"]


# --------------------------------------------------------------------------- persistence


def test_state_round_trip_keeps_tokens_and_queue(world: World, clock: Clock) -> None:
    conn, token = link(world)
    world.close_conn(conn)
    msg_id, _ = post(world, text="queued")
    restored = World(qr_rotate=20.0, clock=clock)
    restored.load_state(world.to_state())
    _conn, actions = hello(restored, token)
    assert types(actions) == ["connected", "message"]
    assert frames(actions)[1]["id"] == msg_id


def test_state_round_trip_keeps_the_self_chat(world: World, clock: Clock) -> None:
    link(world)
    own(world)
    restored = World(qr_rotate=20.0, clock=clock)
    restored.load_state(world.to_state())
    assert restored.self_chat(ACCOUNT) == world.self_chat(ACCOUNT) != []
    state = world.to_state()
    del state["accounts"][0]["self_chat"]  # a state file written before the owner's phone
    restored.load_state(state)
    assert restored.self_chat(ACCOUNT) == []


def test_load_state_rejects_garbage(world: World) -> None:
    with pytest.raises(ValueError, match="state"):
        world.load_state({"version": 1, "accounts": [{"phone": "1"}]})
    with pytest.raises(ValueError, match="version"):
        world.load_state({"version": 99})


# --------------------------------------------------------------------------- connection record


def hello_as(world: World, token: str, client: str) -> tuple[int, list[Action]]:
    conn = world.open_conn()
    return conn, world.device_frame(conn, {"type": "hello", "token": token, "client": client})


def intervals(world: World, phone: str = ACCOUNT) -> list[dict[str, Any]]:
    (device,) = world.connections(phone)["devices"]
    return list(device["intervals"])


def test_each_connection_of_a_device_is_an_interval_with_its_client_and_end(
        world: World, clock: Clock) -> None:
    conn, token = link(world)  # linked by QR: no client label
    clock.now += 5
    world.close_conn(conn)
    clock.now += 3
    conn2, _ = hello_as(world, token, "host-b")
    clock.now += 2
    assert intervals(world) == [
        {"conn": conn, "client": "", "start": 1_000_000.0, "end": 1_000_005.0,
         "ended_by": "closed"},
        {"conn": conn2, "client": "host-b", "start": 1_000_008.0, "end": None,
         "ended_by": None},
    ]
    record = world.connections(ACCOUNT)
    assert record["double_connections"] == 0 and record["overlapping_devices"] == 0
    assert record["devices"][0]["connected"] is True


def test_a_hello_while_the_device_is_connected_counts_a_double_connection(
        world: World, clock: Clock) -> None:
    conn, token = link(world)
    clock.now += 1
    conn2, actions = hello_as(world, token, "host-b")
    assert types(actions, conn) == ["stream_replaced"]  # as before: the old one is replaced
    record = world.connections(ACCOUNT)
    assert record["double_connections"] == 1
    assert record["devices"][0]["double_connections"] == 1
    first, second = intervals(world)
    assert (first["conn"], first["end"], first["ended_by"]) == (conn, 1_000_001.0,
                                                                "stream_replaced")
    assert (second["conn"], second["end"]) == (conn2, None)
    assert world.all_connections()["double_connections"] == 1


def test_a_reconnect_after_the_old_socket_closed_is_no_double_connection(world: World) -> None:
    conn, token = link(world)
    world.close_conn(conn, "ping_timeout")  # the server gave up on a frozen client
    hello_as(world, token, "host-b")
    assert world.connections(ACCOUNT)["double_connections"] == 0
    assert intervals(world)[0]["ended_by"] == "ping_timeout"


@pytest.mark.parametrize(
    ("outcome", "ended_by"),
    [("replace", "stream_replaced"), ("outdated", "client_outdated"),
     ("disconnect", "disconnect"), ("logout", "logged_out"), ("ban", "temporary_ban")],
)
def test_an_interval_ended_by_the_network_says_how(world: World, outcome: str,
                                                   ended_by: str) -> None:
    link(world)
    devices_before = world.connections(ACCOUNT)["devices"]
    world.outcome(ACCOUNT, outcome, {})
    if outcome == "logout":  # the device is gone with its record
        assert devices_before[0]["intervals"][0]["end"] is None
        assert world.connections(ACCOUNT)["devices"] == []
        return
    assert intervals(world)[0]["ended_by"] == ended_by
    assert world.connections(ACCOUNT)["double_connections"] == 0


def test_a_qr_connection_that_never_links_leaves_no_interval(world: World) -> None:
    conn, _ = hello(world)
    world.close_conn(conn)
    assert world.all_connections() == {"double_connections": 0, "overlapping_devices": 0,
                                       "accounts": []}


@pytest.mark.parametrize(
    ("spans", "overlaps"),
    [
        ([], 0),
        ([("a", 0, 5), ("b", 5, 9)], 0),  # back to back
        ([("a", 0, 5), ("b", 4, 9)], 1),
        ([("a", 0, None), ("b", 4, 9)], 1),  # a still connected
        ([("a", 0, 5), ("a", 5, 8), ("b", 1, 2), ("b", 6, 7)], 2),
        ([("a", 0, 10), ("b", 1, 2), ("b", 3, 4), ("c", 5, 6)], 3),
    ],
)
def test_overlapping_devices_counts_pairs_of_different_devices(
        world: World, clock: Clock, spans: list[tuple[str, float, float | None]],
        overlaps: int) -> None:
    from sim.world import Account, Device, Interval  # noqa: PLC0415

    account = Account(ACCOUNT, "A", 0.0)
    for name in sorted({s[0] for s in spans}):
        device = Device(name, f"t-{name}", ACCOUNT, 0.0)
        device.intervals = [Interval(i, "", start, end) for i, (dev, start, end)
                            in enumerate(spans) if dev == name]
        account.devices[name] = device
    world.accounts[ACCOUNT] = account
    clock.now = 100.0
    assert world.connections(ACCOUNT)["overlapping_devices"] == overlaps


def test_two_devices_of_one_account_connected_at_once_overlap(world: World,
                                                             clock: Clock) -> None:
    link(world)
    clock.now += 1
    link(world)  # a second QR link while the first device is still connected
    assert world.connections(ACCOUNT)["overlapping_devices"] == 1
    assert world.connections(ACCOUNT)["double_connections"] == 0


def test_what_a_device_sends_names_the_client_that_sent_it(world: World) -> None:
    _conn, token = link(world)
    post(world)
    conn, _ = hello_as(world, token, "host-b")
    world.device_frame(conn, {"type": "send", "req": 1, "to": f"{CONTACT}@s.whatsapp.net",
                              "text": "from b"})
    assert [m["via"] for m in world.contact_inbox(CONTACT)] == ["host-b"]


def test_a_bad_client_label_is_refused(world: World) -> None:
    _conn, token = link(world)
    conn = world.open_conn()
    actions = world.device_frame(conn, {"type": "hello", "token": token, "client": 7})
    assert types(actions) == ["error"] and "client" in frames(actions)[0]["error"]
    assert world.connections(ACCOUNT)["double_connections"] == 0


def test_connections_of_an_unknown_account_is_404(world: World) -> None:
    with pytest.raises(WorldError) as err:
        world.connections(ACCOUNT)
    assert err.value.status == 404
