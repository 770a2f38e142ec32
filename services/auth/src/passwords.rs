//! Password hashing with argon2id, on a small fixed pool of threads that
//! each own one memory block for the whole life of the process.
//!
//! Why a pool of our own rather than `spawn_blocking`: argon2 needs
//! `m_cost` KiB of memory per hash. Allocated afresh for every hash on
//! whichever blocking thread runs it, that memory is freed into that
//! thread's malloc arena and stays resident there (glibc raises its mmap
//! threshold after the first large free, so later blocks come from arenas
//! and are not returned); with tokio's blocking pool growing to dozens of
//! threads, a few dozen logins left hundreds of MiB resident. Here exactly
//! `threads` blocks exist, allocated once at start, so the memory the
//! hasher uses is `threads × m_cost`, however many logins arrive.
//!
//! Parameters: argon2id, m = 12 MiB, t = 3, p = 1, one of the five settings
//! OWASP's Password Storage Cheat Sheet recommends as equivalent in
//! strength (19 MiB/t=2, 12 MiB/t=3, 9 MiB/t=4, 7 MiB/t=5, 46 MiB/t=1).
//! It costs the same CPU as the 19 MiB setting this service used before
//! (memory × passes is 36 MiB against 38 MiB) and needs 37 % less memory
//! per hasher thread: two hashers take 24 MiB, which with the ~18 MB the
//! rest of the service needs stays well inside its 64 MB budget, where two
//! 19 MiB blocks would leave little room. Hashes made with other parameters (the 19 MiB ones)
//! still verify, and [`Verified::needs_rehash`] tells the caller to store a
//! new hash once the password is known to be right.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use argon2::password_hash::phc::{Output, ParamsString, PasswordHash, Salt};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use subtle::ConstantTimeEq as _;
use tokio::sync::oneshot;

use crate::domain::Password;

/// m = 12 MiB (in KiB), t = 3, p = 1: see the module documentation.
const MEMORY_KIB: u32 = 12 * 1024;
const PASSES: u32 = 3;
const LANES: u32 = 1;
/// Bytes of hash output and of salt, the PHC defaults for argon2.
const OUTPUT_BYTES: usize = 32;
const SALT_BYTES: usize = 16;
/// Memory beyond which a stored hash is refused rather than verified: a
/// corrupted or hostile row must not make a hasher allocate gigabytes.
const MAX_STORED_MEMORY_KIB: u32 = 64 * 1024;

/// What checking a password against a stored hash found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Verified {
    pub(crate) matches: bool,
    /// The stored hash was made with other parameters than today's: once
    /// the password matched, store a new hash of it.
    pub(crate) needs_rehash: bool,
}

/// A unit of work for a hasher thread, given that thread's memory block.
type Job = Box<dyn FnOnce(&mut [Block]) + Send>;

/// Hashes and verifies passwords on `threads` dedicated threads, never on
/// the async threads (a hash takes tens of milliseconds of CPU). Clones
/// share the pool; the threads end when the last clone is dropped.
#[derive(Clone)]
pub(crate) struct Passwords {
    jobs: mpsc::Sender<Job>,
    threads: usize,
    /// Jobs sent and not yet finished, to estimate how long a new one waits.
    backlog: Arc<AtomicUsize>,
    /// Recent duration of one hash, in microseconds (a moving average).
    hash_micros: Arc<AtomicU64>,
    /// Verified against when the user is unknown, so that a login for a
    /// missing account costs what one for an existing account costs.
    dummy_hash: Arc<str>,
}

impl std::fmt::Debug for Passwords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Passwords")
            .field("threads", &self.threads)
            .field("backlog", &self.backlog.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Passwords {
    /// Starts `threads` hasher threads, each with its memory block, and
    /// makes the dummy hash.
    pub(crate) async fn start(threads: usize) -> anyhow::Result<Self> {
        let threads = threads.max(1);
        let (jobs, queue) = mpsc::channel::<Job>();
        // One queue for all the threads: whichever is free takes the next
        // job. The queue itself is unbounded; what bounds it is the
        // admission of requests in front of it (`inflight`).
        let queue = Arc::new(Mutex::new(queue));
        for n in 0..threads {
            let queue = Arc::clone(&queue);
            std::thread::Builder::new()
                .name(format!("password-hasher-{n}"))
                .spawn(move || {
                    let mut memory = vec![Block::new(); params().block_count()];
                    loop {
                        // The lock is held only while waiting for a job, so
                        // the other threads queue up behind this one.
                        let job = queue
                            .lock()
                            .map_err(drop)
                            .and_then(|q| q.recv().map_err(drop));
                        match job {
                            Ok(job) => job(&mut memory),
                            // Every sender is gone: the service is stopping.
                            Err(()) => break,
                        }
                    }
                })
                .context("starting a password hasher thread")?;
        }
        let mut passwords = Self {
            jobs,
            threads,
            backlog: Arc::new(AtomicUsize::new(0)),
            hash_micros: Arc::new(AtomicU64::new(50_000)),
            dummy_hash: Arc::from(""),
        };
        let dummy = Password::presented("a password nobody has").map_err(anyhow::Error::msg)?;
        passwords.dummy_hash = passwords.hash(&dummy).await?.into();
        Ok(passwords)
    }

    /// How long a password check admitted now would wait for a hasher:
    /// the jobs ahead of it, shared among the threads, at the recent pace.
    pub(crate) fn expected_wait(&self) -> Duration {
        let backlog = self.backlog.load(Ordering::Relaxed) as u64;
        let per_hash = self.hash_micros.load(Ordering::Relaxed);
        Duration::from_micros(backlog.saturating_mul(per_hash) / self.threads as u64)
    }

    /// The PHC string of a new hash of `password`, with a fresh salt.
    pub(crate) async fn hash(&self, password: &Password) -> anyhow::Result<String> {
        let password = password.expose().to_owned();
        self.run(move |memory| hash_with(memory, password.as_bytes()))
            .await?
    }

    /// Checks `password` against `stored` (a PHC string). With no stored
    /// hash the dummy is checked instead, and the answer is no.
    pub(crate) async fn verify(
        &self,
        password: &Password,
        stored: Option<&str>,
    ) -> anyhow::Result<Verified> {
        let known = stored.is_some();
        let hash = stored.map_or_else(|| self.dummy_hash.to_string(), str::to_owned);
        let password = password.expose().to_owned();
        let verified = self
            .run(move |memory| verify_with(memory, password.as_bytes(), &hash))
            .await??;
        Ok(Verified {
            matches: known && verified.matches,
            needs_rehash: known && verified.needs_rehash,
        })
    }

    /// Runs `work` on a hasher thread and waits for its answer.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut [Block]) -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let (reply, answer) = oneshot::channel();
        let backlog = Arc::clone(&self.backlog);
        let hash_micros = Arc::clone(&self.hash_micros);
        backlog.fetch_add(1, Ordering::Relaxed);
        let job: Job = Box::new(move |memory| {
            // A caller that gave up (its deadline passed, its client went
            // away) wants no answer: skipping its hash keeps a storm of
            // abandoned requests from costing the CPU of finished ones.
            if !reply.is_closed() {
                let started = Instant::now();
                // A panic must not take a hasher thread with it: the caller
                // sees its reply dropped, and the thread takes the next job.
                let result = std::panic::catch_unwind(AssertUnwindSafe(|| work(memory)));
                let took = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                let average = hash_micros.load(Ordering::Relaxed);
                hash_micros.store((average * 7 + took) / 8, Ordering::Relaxed);
                if let Ok(result) = result {
                    let _ = reply.send(result);
                }
            }
            backlog.fetch_sub(1, Ordering::Relaxed);
        });
        if self.jobs.send(job).is_err() {
            self.backlog.fetch_sub(1, Ordering::Relaxed);
            anyhow::bail!("the password hashers have stopped");
        }
        answer.await.context("a password hasher stopped mid-hash")
    }
}

/// Today's parameters.
fn params() -> Params {
    Params::new(MEMORY_KIB, PASSES, LANES, Some(OUTPUT_BYTES))
        .expect("the argon2 parameters are valid constants")
}

/// Hashes `password` with today's parameters in `memory`.
fn hash_with(memory: &mut [Block], password: &[u8]) -> anyhow::Result<String> {
    let params = params();
    let salt_bytes: [u8; SALT_BYTES] = rand::random();
    let salt = Salt::new(&salt_bytes).map_err(|e| anyhow::anyhow!("argon2 salt: {e}"))?;
    let mut output = [0u8; OUTPUT_BYTES];
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone())
        .hash_password_into_with_memory(password, &salt, &mut output, &mut *memory)
        .map_err(|e| anyhow::anyhow!("hashing a password: {e}"))?;
    let hash = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(&params)
            .map_err(|e| anyhow::anyhow!("encoding argon2 parameters: {e}"))?,
        salt: Some(salt),
        hash: Some(Output::new(&output).map_err(|e| anyhow::anyhow!("argon2 output: {e}"))?),
    };
    Ok(hash.to_string())
}

/// Checks `password` against the PHC string `stored`, in `memory` when it
/// is large enough (every hash made with today's parameters), else in a
/// block of its own for this one check. Those are the hashes made with
/// larger parameters (the 19 MiB ones): the extra memory is bounded, at
/// most one such block per hasher thread, and it is needed once per user,
/// since a matching password is re-hashed with today's parameters.
fn verify_with(memory: &mut [Block], password: &[u8], stored: &str) -> anyhow::Result<Verified> {
    let parsed = PasswordHash::new(stored)
        .map_err(|e| anyhow::anyhow!("stored hash is not a PHC string: {e}"))?;
    let algorithm = Algorithm::new(parsed.algorithm.as_str())
        .map_err(|e| anyhow::anyhow!("stored hash algorithm: {e}"))?;
    let version = parsed
        .version
        .map(Version::try_from)
        .transpose()
        .map_err(|e| anyhow::anyhow!("stored hash version: {e}"))?
        .unwrap_or_default();
    let stored_params =
        Params::try_from(&parsed).map_err(|e| anyhow::anyhow!("stored hash parameters: {e}"))?;
    anyhow::ensure!(
        stored_params.m_cost() <= MAX_STORED_MEMORY_KIB,
        "stored hash asks for {} KiB, more than the {MAX_STORED_MEMORY_KIB} KiB allowed",
        stored_params.m_cost()
    );
    let (salt, expected) = match (&parsed.salt, &parsed.hash) {
        (Some(salt), Some(hash)) => (salt, hash.as_bytes()),
        _ => anyhow::bail!("stored hash has no salt or no output"),
    };
    let mut output = vec![0u8; expected.len()];
    let argon2 = Argon2::new(algorithm, version, stored_params.clone());
    let needed = stored_params.block_count();
    let computed = if needed <= memory.len() {
        argon2.hash_password_into_with_memory(password, salt, &mut output, &mut memory[..needed])
    } else {
        argon2.hash_password_into_with_memory(
            password,
            salt,
            &mut output,
            vec![Block::new(); needed],
        )
    };
    computed.map_err(|e| anyhow::anyhow!("verifying a password: {e}"))?;
    let today = params();
    Ok(Verified {
        matches: bool::from(output.ct_eq(expected)),
        needs_rehash: algorithm != Algorithm::Argon2id
            || version != Version::V0x13
            || stored_params.m_cost() != today.m_cost()
            || stored_params.t_cost() != today.t_cost()
            || stored_params.p_cost() != today.p_cost()
            || expected.len() != OUTPUT_BYTES,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn password(text: &str) -> Password {
        Password::presented(text).unwrap()
    }

    #[tokio::test]
    async fn a_hash_verifies_its_password_and_no_other() {
        let passwords = Passwords::start(1).await.unwrap();
        let hash = passwords
            .hash(&password("correct horse battery"))
            .await
            .unwrap();
        assert!(
            hash.starts_with("$argon2id$v=19$m=12288,t=3,p=1$"),
            "{hash}"
        );
        let right = passwords
            .verify(&password("correct horse battery"), Some(&hash))
            .await
            .unwrap();
        assert_eq!(
            right,
            Verified {
                matches: true,
                needs_rehash: false
            }
        );
        let wrong = passwords
            .verify(&password("correct horse battery!"), Some(&hash))
            .await
            .unwrap();
        assert!(!wrong.matches);
        let unknown = passwords
            .verify(&password("a password nobody has"), None)
            .await
            .unwrap();
        assert!(!unknown.matches, "the dummy never matches");
    }

    #[tokio::test]
    async fn hashes_made_with_the_old_parameters_verify_and_ask_to_be_redone() {
        use argon2::password_hash::PasswordHasher as _;
        // What this service stored before: m = 19 MiB, t = 2, more memory
        // than a hasher thread's block.
        let old = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(19 * 1024, 2, 1, None).unwrap(),
        )
        .hash_password(b"correct horse battery")
        .unwrap()
        .to_string();
        let passwords = Passwords::start(1).await.unwrap();
        let verified = passwords
            .verify(&password("correct horse battery"), Some(&old))
            .await
            .unwrap();
        assert_eq!(
            verified,
            Verified {
                matches: true,
                needs_rehash: true
            }
        );
        let wrong = passwords
            .verify(&password("incorrect horse battery"), Some(&old))
            .await
            .unwrap();
        assert!(!wrong.matches);
    }

    #[tokio::test]
    async fn a_hostile_stored_hash_is_an_error_not_an_allocation() {
        let passwords = Passwords::start(1).await.unwrap();
        let greedy = "$argon2id$v=19$m=4194304,t=1,p=1$c2FsdHNhbHRzYWx0$\
                      AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        let error = passwords
            .verify(&password("correct horse battery"), Some(greedy))
            .await
            .unwrap_err();
        assert!(error.to_string().contains("KiB"), "{error:#}");
    }
}
