//! The ublk kernel ABI (`include/uapi/linux/ublk_cmd.h`): command numbers, flags and the
//! structures exchanged with the driver, as `#[repr(C)]` types with every padding byte named,
//! so `zerocopy` turns them into and from bytes without `unsafe` and a wrong field size fails
//! to compile (the size assertions below) instead of corrupting a command.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `_IOWR('u', nr, size)`: the ioctl-encoded command numbers.
const fn iowr(nr: u32, size: u32) -> u32 {
    (3 << 30) | (size << 16) | ((b'u' as u32) << 8) | nr
}
/// `_IOR('u', nr, size)`.
const fn ior(nr: u32, size: u32) -> u32 {
    (2 << 30) | (size << 16) | ((b'u' as u32) << 8) | nr
}
const CTRL_CMD_LEN: u32 = std::mem::size_of::<CtrlCmd>() as u32;
const IO_CMD_LEN: u32 = std::mem::size_of::<IoCmd>() as u32;
pub const CMD_ADD_DEV: u32 = iowr(0x04, CTRL_CMD_LEN);
pub const CMD_DEL_DEV: u32 = iowr(0x05, CTRL_CMD_LEN);
pub const CMD_START_DEV: u32 = iowr(0x06, CTRL_CMD_LEN);
pub const CMD_STOP_DEV: u32 = iowr(0x07, CTRL_CMD_LEN);
pub const CMD_SET_PARAMS: u32 = iowr(0x08, CTRL_CMD_LEN);
pub const CMD_GET_DEV_INFO: u32 = ior(0x02, CTRL_CMD_LEN);
pub const CMD_START_USER_RECOVERY: u32 = iowr(0x10, CTRL_CMD_LEN);
pub const CMD_END_USER_RECOVERY: u32 = iowr(0x11, CTRL_CMD_LEN);
pub const IO_FETCH_REQ: u32 = iowr(0x20, IO_CMD_LEN);
pub const IO_COMMIT_AND_FETCH_REQ: u32 = iowr(0x21, IO_CMD_LEN);

pub const F_USER_RECOVERY: u64 = 1 << 3;
/// With recovery: requests in flight when the server died are issued again to the next one.
pub const F_USER_RECOVERY_REISSUE: u64 = 1 << 4;
pub const F_CMD_IOCTL_ENCODE: u64 = 1 << 6;
/// Request data moves by pread/pwrite on the char device instead of through buffers the driver
/// maps: no pinned buffer per tag.
pub const F_USER_COPY: u64 = 1 << 7;

/// Where a request's data sits for user copy: `UBLKSRV_IO_BUF_OFFSET + (q_id << 41) + (tag <<
/// 25)`.
pub fn user_copy_pos(q_id: u16, tag: usize) -> u64 {
    0x8000_0000 + ((q_id as u64) << 41) + ((tag as u64) << 25)
}

/// Device states (`ublksrv_ctrl_dev_info.state`) a restarted server can take over.
pub const S_DEV_LIVE: u16 = 1;
pub const S_DEV_QUIESCED: u16 = 2;
pub const S_DEV_FAIL_IO: u16 = 3;

pub const PARAM_TYPE_BASIC: u32 = 1;
pub const ATTR_READ_ONLY: u32 = 1;
/// The device has a volatile write cache: the kernel sends FLUSH for fsync and sync.
pub const ATTR_VOLATILE_CACHE: u32 = 1 << 2;
/// The device honours FUA on writes (`UBLK_IO_F_FUA` in the descriptor).
pub const ATTR_FUA: u32 = 1 << 3;
/// `ublksrv_io_desc.op_flags`: the operation in the low byte, flags above it.
pub const IO_F_FUA: u32 = 1 << 13;

pub const OP_READ: u8 = 0;
pub const OP_WRITE: u8 = 1;
pub const OP_FLUSH: u8 = 2;
pub const OP_DISCARD: u8 = 3;
pub const OP_WRITE_ZEROES: u8 = 5;

/// Most queue depth the driver allows; it also spaces the per-queue descriptor arrays.
pub const MAX_QUEUE_DEPTH: usize = 4096;

/// `struct ublksrv_ctrl_cmd`: a control command (in the first bytes of an 80-byte SQE command).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, IntoBytes, FromBytes, Immutable, KnownLayout)]
pub struct CtrlCmd {
    pub dev_id: u32,
    /// `u16::MAX`: no queue.
    pub queue_id: u16,
    /// Bytes at `addr`.
    pub len: u16,
    pub addr: u64,
    pub data: u64,
    pub dev_path_len: u16,
    pub pad: u16,
    pub reserved: u32,
}

impl CtrlCmd {
    /// A command for device `dev_id` pointing at `len` bytes at `addr`, with `data`.
    pub fn new(dev_id: u32, len: u16, addr: u64, data: u64) -> CtrlCmd {
        CtrlCmd {
            dev_id,
            queue_id: u16::MAX,
            len,
            addr,
            data,
            ..CtrlCmd::default()
        }
    }

    /// The 80-byte command area of a 128-byte SQE.
    pub fn sqe_bytes(&self) -> [u8; 80] {
        let mut c = [0u8; 80];
        c[..std::mem::size_of::<CtrlCmd>()].copy_from_slice(self.as_bytes());
        c
    }
}

/// `struct ublksrv_ctrl_dev_info`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, IntoBytes, FromBytes, Immutable, KnownLayout)]
pub struct DevInfo {
    pub nr_hw_queues: u16,
    pub queue_depth: u16,
    pub state: u16,
    pub pad0: u16,
    pub max_io_buf_bytes: u32,
    pub dev_id: u32,
    pub ublksrv_pid: i32,
    pub pad1: u32,
    pub flags: u64,
    pub ublksrv_flags: u64,
    pub owner_uid: u32,
    pub owner_gid: u32,
    pub reserved1: u64,
    pub reserved2: u64,
}

/// `struct ublksrv_io_desc`: what the request on one tag is (in the mmap'd array).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, IntoBytes, FromBytes, Immutable, KnownLayout)]
pub struct IoDesc {
    pub op_flags: u32,
    pub nr_sectors: u32,
    pub start_sector: u64,
    pub addr: u64,
}

impl IoDesc {
    pub fn op(&self) -> u8 {
        (self.op_flags & 0xff) as u8
    }
    pub fn fua(&self) -> bool {
        self.op_flags & IO_F_FUA != 0
    }
}

/// `struct ublksrv_io_cmd`: FETCH / COMMIT_AND_FETCH for one tag.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, IntoBytes, FromBytes, Immutable, KnownLayout)]
pub struct IoCmd {
    pub q_id: u16,
    pub tag: u16,
    pub result: i32,
    pub addr: u64,
}

impl IoCmd {
    pub fn sqe_bytes(&self) -> [u8; 16] {
        let mut c = [0u8; 16];
        c.copy_from_slice(self.as_bytes());
        c
    }
}

/// `struct ublk_param_basic`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, IntoBytes, FromBytes, Immutable, KnownLayout)]
pub struct ParamBasic {
    pub attrs: u32,
    pub logical_bs_shift: u8,
    pub physical_bs_shift: u8,
    pub io_opt_shift: u8,
    pub io_min_shift: u8,
    pub max_sectors: u32,
    pub chunk_sectors: u32,
    pub dev_sectors: u64,
    pub virt_boundary_mask: u64,
}

/// `struct ublk_params` with the basic part only.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, IntoBytes, FromBytes, Immutable, KnownLayout)]
pub struct Params {
    pub len: u32,
    pub types: u32,
    pub basic: ParamBasic,
}

const _: () = assert!(std::mem::size_of::<CtrlCmd>() == 32);
const _: () = assert!(std::mem::size_of::<DevInfo>() == 64);
const _: () = assert!(std::mem::size_of::<IoDesc>() == 24);
const _: () = assert!(std::mem::size_of::<IoCmd>() == 16);
const _: () = assert!(std::mem::size_of::<ParamBasic>() == 32);
const _: () = assert!(std::mem::size_of::<Params>() == 40);

#[cfg(test)]
mod tests {
    use super::*;

    /// The command numbers the driver expects (from `ublk_cmd.h` on a 6.x kernel).
    #[test]
    fn command_numbers_match_the_kernel_header() {
        assert_eq!(CMD_ADD_DEV, 0xc020_7504);
        assert_eq!(CMD_GET_DEV_INFO, 0x8020_7502);
        assert_eq!(IO_FETCH_REQ, 0xc010_7520);
        assert_eq!(IO_COMMIT_AND_FETCH_REQ, 0xc010_7521);
    }

    /// Fields land at the offsets the driver reads them from.
    #[test]
    fn fields_sit_at_the_kernel_offsets() {
        let c = CtrlCmd::new(7, 64, 0x1122, 9).sqe_bytes();
        assert_eq!(c[0..4], 7u32.to_le_bytes());
        assert_eq!(c[4..6], u16::MAX.to_le_bytes());
        assert_eq!(c[6..8], 64u16.to_le_bytes());
        assert_eq!(c[8..16], 0x1122u64.to_le_bytes());
        assert_eq!(c[16..24], 9u64.to_le_bytes());
        let info = DevInfo {
            dev_id: 3,
            flags: F_USER_COPY,
            ..DevInfo::default()
        };
        assert_eq!(info.as_bytes()[12..16], 3u32.to_le_bytes());
        assert_eq!(info.as_bytes()[24..32], F_USER_COPY.to_le_bytes());
        let p = Params {
            basic: ParamBasic {
                dev_sectors: 5,
                ..ParamBasic::default()
            },
            ..Params::default()
        };
        assert_eq!(p.as_bytes()[24..32], 5u64.to_le_bytes());
    }
}
