//! The little HTTP the loader serves (the health endpoint, `/metrics`):
//! HTTP/1.0, one request per connection, answered once its head is read.

use tokio::net::TcpStream;

/// Reads a request's head from `stream` (at most about 8 KiB) and returns
/// its method and path, without the query; empty strings for what a
/// malformed head lacks.
pub async fn request_line(stream: &TcpStream) -> std::io::Result<(String, String)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        if buf.len() > 8192 {
            break;
        }
        stream.readable().await?;
        match stream.try_read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    let request = String::from_utf8_lossy(&buf);
    let mut parts = request.lines().next().unwrap_or("").split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("");
    let path = path.split('?').next().unwrap_or("").to_string();
    Ok((method, path))
}
