use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A TCP forwarder between a service and one of its dependencies, which a
/// test can cut and restore to make the dependency look down and back up,
/// slow down, or (for gRPC) make lose its answers.
///
/// While cut, open connections are closed and new ones are accepted and
/// closed at once, which is what a client sees of a crashed server.
#[derive(Debug)]
pub struct FaultProxy {
    address: SocketAddr,
    mode: watch::Sender<Mode>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Forward,
    Cut,
    LoseAnswers,
    /// Every chunk of bytes waits this long before it is passed on, in
    /// both directions.
    Delay(Duration),
}

/// What the proxy forwards: opaque bytes, or HTTP/2 frames it can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Bytes,
    Http2,
}

impl FaultProxy {
    /// Starts forwarding a free port of 127.0.0.1 to `target`, any protocol.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        Self::start_with(target, Protocol::Bytes).await
    }

    /// Starts forwarding to a gRPC (HTTP/2, cleartext) server, so that the
    /// proxy can also [lose answers](Self::lose_answers).
    pub async fn start_grpc(target: SocketAddr) -> std::io::Result<Self> {
        Self::start_with(target, Protocol::Http2).await
    }

    async fn start_with(target: SocketAddr, protocol: Protocol) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let (mode, watcher) = watch::channel(Mode::Forward);
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if *watcher.borrow() == Mode::Cut {
                    continue; // dropping `inbound` closes it
                }
                tokio::spawn(forward(inbound, target, protocol, watcher.clone()));
            }
        });
        Ok(Self {
            address,
            mode,
            task,
        })
    }

    /// Where clients should connect instead of the target.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Closes every connection and refuses new ones until [`restore`](Self::restore).
    pub fn cut(&self) {
        self.mode.send_replace(Mode::Cut);
    }

    /// Delivers every request but loses every answer, until
    /// [`restore`](Self::restore): when the server begins to answer a call
    /// (its first HEADERS frame on a stream, sent once the call was
    /// handled), the connection is closed instead. The client sees its
    /// connection break mid-call, and cannot know the call took effect.
    /// Only for a proxy started with [`start_grpc`](Self::start_grpc).
    pub fn lose_answers(&self) {
        self.mode.send_replace(Mode::LoseAnswers);
    }

    /// Holds every chunk of bytes, in both directions and on open
    /// connections too, for `latency` before passing it on, until
    /// [`restore`](Self::restore): a slow network rather than a broken one.
    /// A request and its answer each wait at least `latency`.
    pub fn delay(&self, latency: Duration) {
        self.mode.send_replace(Mode::Delay(latency));
    }

    /// Forwards again.
    pub fn restore(&self) {
        self.mode.send_replace(Mode::Forward);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

async fn forward(
    inbound: TcpStream,
    target: SocketAddr,
    protocol: Protocol,
    mut mode: watch::Receiver<Mode>,
) {
    let Ok(outbound) = TcpStream::connect(target).await else {
        return;
    };
    let (mut client_reads, mut client_writes) = inbound.into_split();
    let (mut server_reads, mut server_writes) = outbound.into_split();
    let watching = mode.clone();
    let answers = async {
        match protocol {
            Protocol::Bytes => copy(&mut server_reads, &mut client_writes, &watching).await,
            Protocol::Http2 => {
                http2_answers(&mut server_reads, &mut client_writes, &watching).await
            }
        }
    };
    // Whichever side ends first ends both: dropping the halves closes them.
    tokio::select! {
        _ = copy(&mut client_reads, &mut server_writes, &watching) => {}
        _ = answers => {}
        _ = mode.wait_for(|mode| *mode == Mode::Cut) => {}
    }
}

/// The latency to add now, if the proxy is delaying.
fn latency(mode: &watch::Receiver<Mode>) -> Option<Duration> {
    match *mode.borrow() {
        Mode::Delay(latency) => Some(latency),
        _ => None,
    }
}

/// Copies bytes until either side ends, holding each chunk while the proxy
/// delays.
async fn copy(
    from: &mut OwnedReadHalf,
    to: &mut OwnedWriteHalf,
    mode: &watch::Receiver<Mode>,
) -> std::io::Result<()> {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = from.read(&mut buffer).await?;
        if read == 0 {
            return Ok(());
        }
        if let Some(latency) = latency(mode) {
            tokio::time::sleep(latency).await;
        }
        to.write_all(&buffer[..read]).await?;
    }
}

const HEADERS: u8 = 0x1;

/// Copies the server's HTTP/2 frames (9-byte header, then payload) to the
/// client, until one begins an answer while answers are being lost.
async fn http2_answers(
    from: &mut OwnedReadHalf,
    to: &mut OwnedWriteHalf,
    mode: &watch::Receiver<Mode>,
) -> std::io::Result<()> {
    let mut header = [0u8; 9];
    loop {
        from.read_exact(&mut header).await?;
        let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
        let mut payload = vec![0; length];
        from.read_exact(&mut payload).await?;
        if header[3] == HEADERS && stream != 0 && *mode.borrow() == Mode::LoseAnswers {
            return Ok(());
        }
        if let Some(latency) = latency(mode) {
            tokio::time::sleep(latency).await;
        }
        to.write_all(&header).await?;
        to.write_all(&payload).await?;
    }
}
