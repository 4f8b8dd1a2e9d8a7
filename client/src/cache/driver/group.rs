//! Several caches of one cluster driven together: each round of their exchanges sends each shard
//! one request, a batch of every table's ([`ShardTransport::exchange_batch`]), so that a model's
//! tables cost a round trip a shard, not one a table and shard.
//!
//! Each cache keeps its own protocol (its core plans, takes answers and completes as alone); only
//! the sending is shared. What holds of each cache's rows and pushes is what holds when it is
//! called alone.

use super::*;

/// Looks up `keys[i]` in `caches[i]` into `outs[i]` (keys x that table's dim) for every `i`, as
/// [`CachedTable::lookup`] would, with one request a shard a round for all of them. The caches
/// must be distinct caches of one [`Cluster`] connection. A cache whose prefetch of the same
/// keys is in flight completes it (an unused one lands first, as alone). On an error every
/// cache's lookup ends (the first error is returned); each push's outcome is accounted for as
/// alone.
pub fn lookup_many(
    caches: &mut [&mut CachedTable],
    keys: &[&[u64]],
    outs: &mut [&mut [f32]],
) -> Result<(), ClientError> {
    let cluster = one_cluster(caches, keys.len(), outs.len())?;
    for ((c, k), out) in caches.iter().zip(keys).zip(outs.iter()) {
        c.check_rows(k, out.len())?;
    }
    let started = Instant::now();
    let mut first_error = None;
    let mut looking = Vec::with_capacity(caches.len());
    for (i, c) in caches.iter_mut().enumerate() {
        if let Some(p) = c.inflight.take() {
            if p.keys == keys[i] {
                c.prefetches.used += 1;
                if let Err(e) = c.land(&p, outs[i], None) {
                    first_error.get_or_insert(e);
                }
                continue;
            }
            c.inflight = Some(p);
            c.land_unused();
        }
        if let Err(e) = c.core.start_lookup(keys[i]) {
            looking
                .iter()
                .for_each(|&j: &usize| caches_abort(caches, j));
            return Err(e.into());
        }
        looking.push(i);
    }
    let planned = Instant::now();
    let result = exchange_all(caches, &looking, &cluster);
    let answered = Instant::now();
    if let Err(e) = result {
        looking.iter().for_each(|&j| caches_abort(caches, j));
        return Err(e);
    }
    for &i in &looking {
        let c = &mut *caches[i];
        if let Err(e) = c.core.complete_lookup(outs[i], None) {
            first_error.get_or_insert(e.into());
        }
        c.time.plan_ns += nanos(planned - started);
        c.time.request_ns += nanos(answered - planned);
        c.time.place_ns += nanos(answered.elapsed());
    }
    caches.iter().for_each(|c| c.publish());
    first_error.map_or(Ok(()), Err)?;
    cluster.check_rollbacks()
}

/// Applies `grads[i]` (one row per key occurrence of `keys[i]`) to `caches[i]` for every `i`,
/// as [`CachedTable::update`] would, and sends what is due to push with one request a shard for
/// all of them. Every input is checked first: when one is invalid nothing changes anywhere.
pub fn update_many(
    caches: &mut [&mut CachedTable],
    keys: &[&[u64]],
    grads: &[&[f32]],
) -> Result<(), ClientError> {
    let cluster = one_cluster(caches, keys.len(), grads.len())?;
    for ((c, k), g) in caches.iter().zip(keys).zip(grads) {
        c.core.check_update(k, g)?;
    }
    let started = Instant::now();
    let mut pushing = Vec::with_capacity(caches.len());
    for (i, c) in caches.iter_mut().enumerate() {
        if c.inflight.is_some() {
            // Kept until the prefetch lands, as alone.
            c.late_keys.extend_from_slice(keys[i]);
            c.late_grads.extend_from_slice(grads[i]);
            continue;
        }
        c.core.update(keys[i], grads[i])?;
        c.core.start_push();
        pushing.push(i);
    }
    let updated = Instant::now();
    let result = exchange_all(caches, &pushing, &cluster);
    for &i in &pushing {
        let c = &mut *caches[i];
        c.time.update_ns += nanos(updated - started);
        c.time.push_ns += nanos(updated.elapsed());
        if let Err(e) = &result {
            if c.core.unsent() > 0 {
                tracing::warn!(table = %c.table.spec().name, rows = c.core.unsent(), error = %e, "push failed; rows kept for the next call");
            }
        }
    }
    caches.iter().for_each(|c| c.publish());
    result.and_then(|()| cluster.check_rollbacks())
}

/// Starts the lookup of `keys[i]` in `caches[i]` for every `i`, as each cache's
/// [`CachedTable::prefetch`] would, and returns: the requests of all of them go as one batch a
/// shard, sent by a thread of its own, while the caller computes. Each cache's lookup (alone, or
/// in [`lookup_many`]) of the same keys completes its part; what holds of the rows is what holds
/// of a prefetch. A prefetch in flight in any of them lands first, unused.
pub fn prefetch_many(caches: &mut [&mut CachedTable], keys: &[&[u64]]) -> Result<(), ClientError> {
    let cluster = one_cluster(caches, keys.len(), keys.len())?;
    let mut requests = Vec::new();
    let mut mine: Vec<Vec<usize>> = Vec::with_capacity(caches.len());
    for i in 0..caches.len() {
        let c = &mut *caches[i];
        c.land_unused();
        let started = Instant::now();
        if let Err(e) = c.core.start_prefetch(keys[i]) {
            caches[..i].iter_mut().for_each(|c| c.unsent_prefetch());
            return Err(e.into());
        }
        let planned = c.core.requests();
        mine.push((requests.len()..requests.len() + planned.len()).collect());
        let table = &c.table.spec().name;
        requests.extend(
            planned
                .iter()
                .map(|r| (table.clone(), OwnedRequest::new(r))),
        );
        c.time.plan_ns += nanos(started.elapsed());
    }
    let shared = if requests.is_empty() {
        None
    } else {
        match SharedAnswers::start(cluster.clone(), requests) {
            Ok(s) => Some(s),
            Err(e) => {
                caches.iter_mut().for_each(|c| c.unsent_prefetch());
                return Err(ClientError::Prefetch(format!(
                    "cannot start the thread: {e}"
                )));
            }
        }
    };
    for ((c, k), mine) in caches.iter_mut().zip(keys).zip(mine) {
        let sent = !mine.is_empty();
        c.inflight = Some(InFlight {
            keys: k.to_vec(),
            sent,
            shared: shared.clone().filter(|_| sent).map(|s| (s, mine)),
        });
    }
    caches.iter().for_each(|c| c.publish());
    cluster.check_rollbacks()
}

/// The one cluster of `caches` (checked open), after checking that `keys` and `buffers` inputs
/// number one a cache and that no cache comes twice.
fn one_cluster(
    caches: &[&mut CachedTable],
    keys: usize,
    buffers: usize,
) -> Result<Cluster, ClientError> {
    let invalid = |what: String| Err(ClientError::InvalidGroup(what));
    if keys != caches.len() || buffers != caches.len() {
        return invalid(format!(
            "{} caches, {keys} key arrays and {buffers} row arrays",
            caches.len()
        ));
    }
    let Some(first) = caches.first() else {
        return invalid("no cache".into());
    };
    let cluster = first.table.cluster().clone();
    for (i, c) in caches.iter().enumerate() {
        if !c.table.cluster().same(&cluster) {
            return invalid(format!(
                "cache {i} (table {}) is of another cluster connection than cache 0",
                c.table.spec().name
            ));
        }
        if caches[..i]
            .iter()
            .any(|o| std::ptr::eq::<CachedTable>(&**o, &**c))
        {
            return invalid(format!(
                "cache {i} (table {}) comes twice",
                c.table.spec().name
            ));
        }
    }
    cluster.check_open()?;
    Ok(cluster)
}

fn caches_abort(caches: &mut [&mut CachedTable], i: usize) {
    caches[i].core.abort_lookup();
}

/// Sends what the cores of `which` ask for, round after round, each shard's requests of a round
/// in one batch (shards in parallel), and hands every answer to its core, until none asks for
/// more or a shard fails; the first failure is returned, after every answer was taken.
fn exchange_all(
    caches: &mut [&mut CachedTable],
    which: &[usize],
    cluster: &Cluster,
) -> Result<(), ClientError> {
    loop {
        let mut requests = Vec::new();
        for &i in which {
            let c = &*caches[i];
            let table = c.table.spec().name.as_str();
            requests.extend(c.core.requests().into_iter().map(|r| (i, table, r)));
        }
        if requests.is_empty() {
            return Ok(());
        }
        let answers = send_batched(cluster, &requests);
        let sent: Vec<(usize, usize)> = requests.iter().map(|(i, _, r)| (*i, r.shard)).collect();
        drop(requests);
        let mut first_error = None;
        let mut answers: Vec<Option<Answer>> = answers.into_iter().map(Some).collect();
        for &i in which {
            let (shards, mine): (Vec<usize>, Vec<Answer>) = sent
                .iter()
                .zip(answers.iter_mut())
                .filter(|((c, _), _)| *c == i)
                .map(|((_, s), a)| (*s, a.take().expect("each answer taken once")))
                .unzip();
            if shards.is_empty() {
                continue;
            }
            if let Err(e) = caches[i].take_answers(&shards, mine) {
                first_error.get_or_insert(e);
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
    }
}

/// Sends one round of the caches' requests (`(cache, table, request)`): each shard's in one
/// batch, shards in parallel. The answers in the requests' order.
pub(in crate::cache) fn send_batched(
    cluster: &Cluster,
    requests: &[(usize, &str, ShardRequest<'_>)],
) -> Vec<Answer> {
    let mut shards: Vec<usize> = requests.iter().map(|(_, _, r)| r.shard).collect();
    shards.sort_unstable();
    shards.dedup();
    let per_shard = cluster.on_shards(&shards, |s, shard| {
        let mine: Vec<usize> = (0..requests.len())
            .filter(|&k| requests[k].2.shard == s)
            .collect();
        let sent: Vec<(usize, Exchange<'_>)> = mine
            .iter()
            .filter_map(|&k| requests[k].2.exchange(requests[k].1).map(|e| (k, e)))
            .collect();
        let exchanges: Vec<Exchange<'_>> = sent.iter().map(|(_, e)| *e).collect();
        let mut outs: Vec<StaleRows> = (0..exchanges.len()).map(|_| StaleRows::default()).collect();
        let carried = shard.exchange_batch(&exchanges, &mut outs);
        let mut answers: Vec<(usize, Answer)> = sent
            .iter()
            .zip(carried.into_iter().zip(outs))
            .map(|((k, _), (c, rows))| (*k, (c.push, rows, c.read)))
            .collect();
        // A push of no rows sends nothing.
        answers.extend(
            mine.iter()
                .filter(|k| !sent.iter().any(|(j, _)| j == *k))
                .map(|&k| (k, (PushOutcome::NotSent, StaleRows::default(), Ok(())))),
        );
        Ok(answers)
    });
    let mut answers: Vec<Option<Answer>> = (0..requests.len()).map(|_| None).collect();
    for (s, result) in shards.iter().zip(per_shard) {
        match result {
            Ok(list) => list.into_iter().for_each(|(k, a)| answers[k] = Some(a)),
            Err(e) => {
                for k in (0..requests.len()).filter(|&k| requests[k].2.shard == *s) {
                    answers[k] = Some((PushOutcome::Lost, StaleRows::default(), Err(e.again())));
                }
            }
        }
    }
    answers
        .into_iter()
        .map(|a| a.expect("an answer for every request"))
        .collect()
}
