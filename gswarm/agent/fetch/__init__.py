"""Moving bytes onto a node. Everything here blocks and runs in worker threads;
`common.run_blocking` bridges to asyncio (cancellation sets a flag the workers check).

- `common`: errors (TransferError, Cancelled, local_write_error) and thread primitives
  (ByteCounter, RateLimit, run_blocking).
- `http_client`: keep-alive `http.client` connections, redirects, HTTP errors, fetch_json.
- `hub`: what to fetch (RemoteFile, FetchPlan), resolved from a Hub repo or a plain URL.
- `ranges`: the parallel range downloader and its resume state (state and plan files).
- `verify`: checksums of fetched or local files, manifests.
- `local`: the local copy engine (copy_file_range) and listing local sources.

Import from the specific modules; this package re-exports nothing.
"""
