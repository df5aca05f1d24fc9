"""wabridge-sim: a small local stand-in for WhatsApp's network.

Users try the bridge with it (no phone, no ban risk) and tests drive it over a loopback HTTP
API. :mod:`sim.world` is the pure in-memory model, :mod:`sim.server` the aiohttp app (device
WebSocket + test/phone API), :mod:`sim.main` the ``wabridge-sim`` entry point.

Device WebSocket protocol (``GET /ws/device``, JSON text frames), device -> sim:

- ``{"type":"hello","token":<str|null>,"client":<str>?}`` first (``client``: a label the
  sim keeps with the connection's interval, e.g. the host a fleet worker runs on); then
- ``{"type":"ack","id":...}`` for each delivered ``message`` (unacked ones are re-delivered on
  the next connect: at-least-once, like WhatsApp's offline queue);
- ``{"type":"send","req":n,"to":<jid>,"text":...,"quote_id":...}`` -> ``sent``/``send_error``;
- ``{"type":"typing","to":<jid>,"on":bool}``, ``{"type":"read","chat":<jid>,"ids":[...]}``;
- ``{"type":"pair_phone","phone":...}`` -> ``pairing_code``.

A ``message`` with ``"from_me": true`` was written by the account itself on its phone (in the
self chat or any chat); the device acks it like any other.

sim -> device: ``qr``, ``qr_expired``, ``pairing_code``, ``paired`` (carries the token to
persist), ``connected``, ``message``, ``sent``, ``send_error``, ``logged_out``,
``stream_replaced``, ``temporary_ban``, ``client_outdated``, ``error``.
"""
