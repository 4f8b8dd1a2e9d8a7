//! The shard as the protocol's [`ShardService`]: each operation measured, its errors mapped to
//! wire codes.

use hetkv_transport::codec;
use hetkv_transport::service::{Response, ServerCounters, ShardService};
use hetkv_transport::wire::{
    CheckpointRequest, CheckpointResponse, CreateResponse, ErrorCode, PushResponse,
    RegionDescriptor, ShardStats, TablesResponse, WireError,
};
use hetkv_transport::TableSpec;

use super::{Served, Shard};
use crate::sessions;
use crate::StoreError;

impl ShardService for Shard {
    fn identity(&self) -> (u32, u32) {
        (self.config.shard, self.config.shards)
    }

    fn incarnation(&self) -> u64 {
        self.incarnation.load(std::sync::atomic::Ordering::Acquire)
    }

    fn applied_pushes(&self, client: u64) -> Option<hetkv_transport::wire::AppliedPushes> {
        self.sessions.applied_of(client)
    }

    #[cfg(feature = "rdma")]
    fn rdma_connect(
        &self,
        client: &hetkv_transport::wire::Endpoint,
    ) -> Result<(hetkv_transport::wire::Endpoint, Box<dyn Send>), WireError> {
        let Some(device) = &self.device else {
            return Err(WireError::new(
                ErrorCode::Unsupported,
                "this daemon was started without --rdma",
            ));
        };
        let (ours, qp) = hetkv_transport::rdma::accept(device, client)
            .map_err(|e| WireError::new(ErrorCode::Internal, format!("RDMA accept: {e}")))?;
        tracing::info!(
            qpn = ours.qpn,
            peer_qpn = client.qpn,
            "RDMA queue pair connected"
        );
        Ok((ours, Box::new(qp)))
    }

    fn authorize(&self, nonce: Option<&[u8; 32]>, response: Option<&[u8; 32]>) -> bool {
        match (&self.config.auth_token, nonce, response) {
            (None, _, _) => true,
            (Some(token), Some(nonce), Some(response)) => {
                hetkv_transport::auth::verify(token, nonce, response)
            }
            (Some(_), _, _) => false,
        }
    }

    fn list_tables(&self) -> TablesResponse {
        TablesResponse {
            tables: self
                .tables()
                .iter()
                .map(|t| t.info())
                .chain(self.dynamic_tables().iter().map(|t| t.info()))
                .collect(),
        }
    }

    fn create_table(&self, spec: TableSpec) -> Result<CreateResponse, WireError> {
        let name = spec.name.clone();
        self.measured("create_table", &name, || {
            let (info, created) = self.create_spec(spec)?;
            Ok(CreateResponse { info, created })
        })
    }

    fn shm_dir(&self) -> Option<String> {
        self.placement
            .shm_instance()
            .map(|d| d.display().to_string())
    }

    fn drop_table(&self, table: &str) -> Result<bool, WireError> {
        Ok(self.drop_table(table)?)
    }

    fn region_info(&self, table: &str) -> Result<RegionDescriptor, WireError> {
        let served = match self.dynamic_table(table) {
            Some(t) => Served::Dynamic(t),
            None => Served::Fixed(self.table(table)?),
        };
        Ok(self.describe(&served))
    }

    fn read(
        &self,
        req: codec::read::Request<'_>,
        resp: &mut Response<'_>,
    ) -> Result<(), WireError> {
        self.measured("read", "", || Ok(self.read_spans(req, resp)?))
    }

    fn pull(
        &self,
        req: &codec::pull::Request<'_>,
        resp: &mut Response<'_>,
    ) -> Result<(), WireError> {
        self.measured("pull", &req.table, || Ok(self.pull_rows(req, resp)?))
    }

    fn pull_if_stale(
        &self,
        req: &codec::pull_if_stale::Request<'_>,
        resp: &mut Response<'_>,
    ) -> Result<(), WireError> {
        self.measured("pull_if_stale", &req.header.table, || {
            Ok(self.pull_stale(req, resp)?)
        })
    }

    fn push(
        &self,
        req: &codec::push::Request<'_>,
        resp: &mut Response<'_>,
    ) -> Result<(), WireError> {
        self.measured("push", &req.table, || Ok(self.push_rows(req, resp)?))
    }

    fn assign(&self, req: &codec::assign::Request<'_>) -> Result<PushResponse, WireError> {
        self.measured("assign", &req.table, || Ok(self.assign_rows(req)?))
    }

    fn scan(
        &self,
        req: &hetkv_transport::wire::ScanRequest,
        resp: &mut Response<'_>,
    ) -> Result<(), WireError> {
        self.measured("scan", &req.table, || {
            let t = self.dynamic_only(&req.table, "pull its rows 0 to rows - 1")?;
            let (header, keys, versions, payloads) = t.scan(req.from, req.slots)?;
            codec::scan::respond(resp, header, &keys, &versions, &payloads)
        })
    }

    fn evictions(
        &self,
        req: &hetkv_transport::wire::EvictionsRequest,
    ) -> Result<hetkv_transport::wire::EvictionsResponse, WireError> {
        self.measured("evictions", &req.table, || {
            let t = self.dynamic_only(&req.table, "it evicts nothing")?;
            Ok(t.evictions(req.cursor, req.max)?)
        })
    }

    fn advance_step(
        &self,
        req: &hetkv_transport::wire::AdvanceStepRequest,
    ) -> Result<hetkv_transport::wire::AdvanceStepResponse, WireError> {
        self.measured("advance_step", &req.table, || {
            let t = self.dynamic_only(&req.table, "it keeps no training step")?;
            let (step, expired) = t.rows().advance_step(req.step)?;
            Ok(hetkv_transport::wire::AdvanceStepResponse { step, expired })
        })
    }

    fn checkpoint(&self, req: &CheckpointRequest) -> Result<CheckpointResponse, WireError> {
        self.measured("checkpoint", "", || {
            Ok(Shard::checkpoint(self, &req.name, req.incremental)?)
        })
    }

    fn stats(&self) -> ShardStats {
        let tables: Vec<_> = self
            .tables()
            .iter()
            .map(|t| t.stats())
            .chain(self.dynamic_tables().iter().map(|t| t.stats()))
            .collect();
        ShardStats {
            shard: self.config.shard,
            shards: self.config.shards,
            rows_read: tables.iter().map(|t| t.rows_read).sum(),
            rows_pushed: tables.iter().map(|t| t.rows_pushed).sum(),
            tables,
            ..ShardStats::default()
        }
    }

    fn counters(&self) -> &ServerCounters {
        &self.counters
    }
}

impl From<StoreError> for WireError {
    fn from(e: StoreError) -> Self {
        let code = match &e {
            StoreError::UnknownTable(_) => ErrorCode::UnknownTable,
            StoreError::ConflictingTable(_) => ErrorCode::ConflictingTable,
            StoreError::InvalidSpec(_) => ErrorCode::InvalidSpec,
            StoreError::WrongDim(_) => ErrorCode::WrongDim,
            StoreError::KeyOutOfRange(_) => ErrorCode::KeyOutOfRange,
            StoreError::InvalidGradient(_) => ErrorCode::InvalidGradient,
            StoreError::InvalidSpan(_) => ErrorCode::InvalidSpan,
            StoreError::Unsupported(_) => ErrorCode::Unsupported,
            StoreError::Malformed(_) => ErrorCode::MalformedFrame,
            StoreError::Frame(w) => return w.clone(),
            StoreError::Io(_) | StoreError::Config(_) => ErrorCode::Internal,
            StoreError::Checkpoint(_) => ErrorCode::CheckpointFailed,
            StoreError::Session(sessions::SessionError::Forgotten { .. }) => {
                ErrorCode::SequenceForgotten
            }
            StoreError::Session(sessions::SessionError::Full(_)) => ErrorCode::SessionsFull,
            StoreError::Session(sessions::SessionError::Malformed { .. }) => {
                ErrorCode::MalformedFrame
            }
        };
        WireError::new(code, e.to_string())
    }
}
