/*
 * tests/list.h - the explicit list of tests: X(name, timeout_seconds).
 * Order matters only for reading the output: pure units first, then tests
 * that start processes.
 */
/* ---- channel (tests/unit/test-channel.c) ---- */
X(channel_be_golden, 10)
X(channel_roundtrip_and_sticky_error, 10)
X(channel_str8_hostile, 10)
X(channel_mem_writer_limit, 10)
X(channel_fd_large_and_small, 10)
X(channel_write_to_closed_peer, 10)
/* ---- stream records (tests/unit/test-stream.c) ---- */
X(stream_header_golden, 10)
X(stream_record_golden, 10)
X(stream_save_golden, 10)
X(stream_record_roundtrip, 10)
X(stream_check_detects_reorder, 10)
X(stream_lying_length_is_bounded, 10)
X(stream_bad_header, 10)
/* ---- vmstate (tests/unit/test-vmstate.c) ---- */
/* ---- save/load loops (tests/unit/test-migration.c) ---- */
X(migration_file_roundtrip, 20)
X(migration_precopy_rounds, 20)
X(migration_commands, 20)
X(migration_save_failure_cleans_up, 10)
X(migration_load_failure_names_section, 10)
X(migration_device_set_mismatch, 10)
X(migration_registry_rules, 10)
X(migration_two_contexts_concurrently, 30)
/* ---- hostile input (tests/unit/test-hostile.c) ---- */
X(hostile_every_truncation, 60)
X(hostile_byte_flips, 60)
X(hostile_absurd_lengths, 60)
X(hostile_semantics, 10)
X(hostile_fuzz_smoke, 60)
/* ---- transports (tests/unit/test-transport.c) ---- */
X(transport_uri_parse, 10)
X(transport_tcp_roundtrip, 10)
X(transport_tcp_multi_channel, 10)
X(transport_tcp_ipv6_loopback, 10)
X(transport_tcp_refused, 10)
X(transport_accept_timeout, 10)
X(transport_accept_eintr, 10)
X(transport_unix_roundtrip, 10)
X(transport_unix_not_a_socket, 10)
X(transport_unix_close_keeps_newer, 10)
X(transport_unix_connect_timeout, 10)
X(transport_open_incoming_socket, 10)
X(transport_fd_roundtrip, 10)
X(transport_file_roundtrip, 10)
X(transport_tcp_hostnames, 10)
X(transport_no_fd_leaks, 10)
/* ---- CLI (tests/unit/test-cli.c) ---- */
X(cli_inspect_shows_every_section, 20)
X(cli_inspect_json, 20)
X(cli_inspect_damaged, 20)
X(cli_vmstate_schema, 20)
X(cli_unknown_command, 20)
