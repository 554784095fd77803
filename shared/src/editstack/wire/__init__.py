"""The wire: message types (`protocol`), message <-> frames (`codec`), the server loop and the client
(`transport`). Depends on nothing else of editstack but `errors`."""
