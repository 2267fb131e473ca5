"""Storage: the contract (`contract`), the group-commit writer every write goes through
(`writer`), the SQLite backend (`sqlite_queue`; credentials and DKIM keys in
`relay.credentials` and `relay.dkim_keys`), and `factory.open_stores`, the one place the
daemon, the delivery process and the CLI get their stores from."""
