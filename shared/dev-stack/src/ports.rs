use std::net::TcpListener;

/// A TCP port on 127.0.0.1 that was free a moment ago.
///
/// For servers that cannot be handed an already bound socket (PostgreSQL,
/// the broker). Another process could take the port in between; callers
/// that start such a server retry with a new port when it fails to bind.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
